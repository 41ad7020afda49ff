package qemutests

import (
	"encoding/base64"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/unlockrd/unlockrd/qemu-tests/harness"
)

// Key delivery under attack and outage (issue 4). Two boots:
//   - the key server first presents the wrong certificate (another data
//     folder's TLS key, same port): the console shows the refusals, then
//     the pinned server takes over the port and the VM boots untouched;
//   - three URLs, the first a closed port, the second a black hole that
//     accepts TCP and never answers TLS, the third the real server: the
//     boot goes through the third without waiting out the black hole's
//     attempt timeout. The token comes from rd.unlockrd.token= because
//     the SMBIOS credential is malformed, and the console says so.

// guestAddr is how the guest on user networking reaches a host port.
func guestAddr(hostAddr string) string {
	_, port, _ := net.SplitHostPort(hostAddr)
	return harness.GuestHostIP + ":" + port
}

func TestKeyServerWrongCertificateThenRight(t *testing.T) {
	ctx := t.Context()
	s := newSkeleton(t, ctx)
	pinned, err := harness.RunTool(ctx, s.bins.KeyServer, "pin", "--data", s.data)
	if err != nil {
		t.Fatal(err)
	}
	// Another server's data folder: its TLS key is not the pinned one.
	impostorData := filepath.Join(s.dir, "impostor")
	if _, err := harness.NewKeyServerData(ctx, s.bins.KeyServer, impostorData); err != nil {
		t.Fatal(err)
	}
	impostor, err := harness.StartKeyServer(ctx, s.bins.KeyServer, impostorData, "", testLog{t})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(impostor.Stop)
	addr := impostor.Addr
	img := s.image(t, ctx, harness.ImageConfig{
		URLs: []string{impostor.GuestURL()},
		Pins: []string{strings.TrimSpace(string(pinned))},
	})
	before := partitions(t, s.fx)
	opts := s.vmOptions(img)
	// The binary credential form this time (the skeleton test uses the
	// text form).
	opts.SMBIOS = []string{"type=11,value=io.systemd.credential.binary:unlockrd.token=" +
		base64.StdEncoding.EncodeToString([]byte(s.token))}
	vm := harness.StartVM(t, opts)

	refusal := `^unlockrd: key: ` + regexp.QuoteMeta(guestAddr(addr)) + `: TLS: pin check failed: no certificate from the server matches a configured pin \(its key is sha256//[A-Za-z0-9+/=]+\); retrying in [0-9.]+s$`
	vm.ExpectLine(refusal, stageTimeout)
	vm.ExpectLine(refusal, stageTimeout)
	if l, ok := vm.Find(`^unlockrd: volumes:`); ok {
		t.Fatalf("volumes unlocked while the wrong server answered: %s", l.Text)
	}
	impostor.Stop()
	if strings.Contains(impostor.Logs(), s.uuid) || strings.Contains(impostor.Logs(), `"GET`) {
		t.Errorf("the impostor received a request although the pin check failed:\n%s", impostor.Logs())
	}
	assertUnchanged(t, before, s.fx)

	// The right server takes over the same port; the VM is not touched.
	right, err := harness.StartKeyServer(ctx, s.bins.KeyServer, s.data, addr, testLog{t})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(right.Stop)
	l := vm.ExpectLine(`^unlockrd: key: 1 key\(s\) for host `+regexp.QuoteMeta(s.uuid)+` from `+regexp.QuoteMeta(guestAddr(addr))+` \([0-9.]+s\)$`, bootTimeout)
	t.Logf("after the refusals: %s", l)
	rep := vm.ExpectReport(bootTimeout)
	if m, ok := rep.Mount(harness.DataMountPoint); !ok || m.Source != "/dev/mapper/data" {
		t.Errorf("data mount = %+v, want /dev/mapper/data", m)
	}
	if f, ok := rep.Files[harness.HelloPath]; !ok || f.SHA256 != s.fx.HelloSHA256() {
		t.Errorf("data file %s = %+v, want sha256 %s", harness.HelloPath, f, s.fx.HelloSHA256())
	}
	vm.Wait(bootTimeout)
	if !strings.Contains(right.Logs(), s.uuid) {
		t.Errorf("the pinned server's audit log does not mention the host:\n%s", right.Logs())
	}
}

// blackHole listens on loopback and accepts connections without ever
// answering, until the test ends.
func blackHole(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns []net.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c)
		}
	}()
	t.Cleanup(func() {
		l.Close()
		<-done
		for _, c := range conns {
			c.Close()
		}
	})
	return l.Addr().String()
}

func closedPort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

func TestKeyFailoverPastDownAndBlackHoledServers(t *testing.T) {
	ctx := t.Context()
	s := newSkeleton(t, ctx)
	s.start(t, ctx)
	down, hole := closedPort(t), blackHole(t)
	url := func(addr string) string { return "https://" + guestAddr(addr) + "/v1/keys/{host}" }
	img := s.image(t, ctx, harness.ImageConfig{
		URLs: []string{url(down), url(hole), s.server.GuestURL()},
		// Far longer than the boot: only the staggered start gets past
		// the black hole; tried strictly in turn, this boot would sit a
		// minute on it first.
		AttemptTimeout: "60s",
	})
	opts := s.vmOptions(img)
	opts.SMBIOS = []string{"type=11,value=io.systemd.credential.binary:unlockrd.token=!!" + s.token}
	opts.Append = []string{"rd.unlockrd.token=" + s.token}
	vm := harness.StartVM(t, opts)

	vm.ExpectLine(`^unlockrd: key: token: SMBIOS credential unlockrd\.token: malformed \(the binary form's value is not base64\); using rd\.unlockrd\.token= instead$`, stageTimeout)
	g := func(a string) string { return regexp.QuoteMeta(guestAddr(a)) }
	vm.ExpectLine(`^unlockrd: key: `+g(down)+`: connection refused; trying `+g(hole)+`$`, stageTimeout)
	vm.ExpectLine(`^unlockrd: key: `+g(hole)+`: no answer yet after 1s; trying `+g(s.server.Addr)+` as well$`, stageTimeout)
	vm.ExpectNot(`^unlockrd: key: `+g(hole)+`: no TLS handshake within`,
		`^unlockrd: key: 1 key\(s\) for host `+regexp.QuoteMeta(s.uuid)+` from `+g(s.server.Addr)+` \([0-9.]+s\)$`, bootTimeout)
	rep := vm.ExpectReport(bootTimeout)
	if m, ok := rep.Mount(harness.DataMountPoint); !ok || m.Source != "/dev/mapper/data" {
		t.Errorf("data mount = %+v, want /dev/mapper/data", m)
	}
	vm.Wait(bootTimeout)
	if !strings.Contains(s.server.Logs(), s.uuid) {
		t.Errorf("the key server's audit log does not mention the host:\n%s", s.server.Logs())
	}
	if _, ok := vm.Find(`^unlockrd: warning: rd\.unlockrd\.token is readable by every user of the booted system`); !ok {
		t.Errorf("no warning that the token sits in /proc/cmdline")
	}
	// The kernel and the booted system echo the command line (that is
	// the warning's point); unlockrd itself never prints the token.
	for _, l := range vm.Lines() {
		if strings.HasPrefix(l.Text, "unlockrd:") && strings.Contains(l.Text, s.token) {
			t.Errorf("unlockrd printed the token: %q", l.Text)
		}
	}
}

// TestBuildRefusesBadKeyConfig: a malformed pin or URL stops
// `mkunlockrd build` with the field named, and writes no image. (No VM.)
func TestBuildRefusesBadKeyConfig(t *testing.T) {
	ctx := t.Context()
	b, err := harness.Binaries(ctx)
	if err != nil {
		t.Fatal(err)
	}
	good := harness.ImageConfig{
		URLs: []string{"https://keys-a.example.net:8443/v1/keys/{host}"},
		Pins: []string{"sha256//7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRhJ3Y="},
	}
	for _, tc := range []struct {
		name  string
		mod   func(*harness.ImageConfig)
		field string
	}{
		{"pin not base64", func(c *harness.ImageConfig) { c.Pins = []string{c.Pins[0], "sha256//not-base64!"} }, "key.pins[1]: malformed pin"},
		{"pin without prefix", func(c *harness.ImageConfig) { c.Pins = []string{"7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRhJ3Y="} }, "key.pins[0]: malformed pin"},
		{"pin of the wrong length", func(c *harness.ImageConfig) { c.Pins = []string{"sha256//AAAA"} }, "key.pins[0]: malformed pin"},
		{"plain http", func(c *harness.ImageConfig) { c.URLs = []string{"http://keys-a.example.net/v1/keys/{host}"} }, "key.urls[0]: URL"},
		{"no host", func(c *harness.ImageConfig) { c.URLs = append(c.URLs, "https:///v1/keys/{host}") }, "key.urls[1]: URL"},
		{"port out of range", func(c *harness.ImageConfig) { c.URLs = []string{"https://keys-a.example.net:70000/{host}"} }, "key.urls[0]: URL"},
		{"credentials in the URL", func(c *harness.ImageConfig) { c.URLs = []string{"https://u:p@keys-a.example.net/{host}"} }, "key.urls[0]: URL"},
		{"literal token", func(c *harness.ImageConfig) { c.Token = "hunter2" }, "key.token"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := good
			tc.mod(&c)
			dir := t.TempDir()
			_, err := harness.BuildImage(ctx, b, c, dir)
			if err == nil || !strings.Contains(err.Error(), "unlockrd.yaml: "+tc.field) {
				t.Fatalf("err = %v, want it to name %s", err, tc.field)
			}
			if _, err := os.Stat(filepath.Join(dir, "initramfs.img")); err == nil {
				t.Fatal("an image was written")
			}
		})
	}
	if _, err := harness.BuildImage(ctx, b, good, t.TempDir()); err != nil {
		t.Fatalf("the good configuration does not build: %v", err)
	}
}
