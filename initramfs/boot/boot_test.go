package boot

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/unlock/blockdev"
	"github.com/unlockrd/unlockrd/unlock/secret"

	"github.com/unlockrd/unlockrd/initramfs/config"
	"github.com/unlockrd/unlockrd/initramfs/layout"
	"github.com/unlockrd/unlockrd/initramfs/retry"
	"github.com/unlockrd/unlockrd/initramfs/sysroot"
	"github.com/unlockrd/unlockrd/initramfs/ulog"
	"github.com/unlockrd/unlockrd/netboot/netup"
	"github.com/unlockrd/unlockrd/unlock/keys"
	"github.com/unlockrd/unlockrd/unlock/pin"
	"github.com/unlockrd/unlockrd/unlock/volumes"
)

// The tests drive Run through fake stages: real configuration, console,
// identity sources (on a fixture /sys) and pipeline, no kernel.

const testUUID = "3cf13ff2-1b7b-4f3a-9c1e-0123456789ab"

// syncBuf is the console's output, read while stages still write.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type fakeNet struct{ torn bool }

func (n *fakeNet) String() string  { return "eth0 10.0.2.15/24 via dhcp" }
func (n *fakeNet) Teardown() error { n.torn = true; return nil }

var errSwitched = errors.New("fake switch root: exec")

type fixture struct {
	t       *testing.T
	image   string
	sys     string
	out     *syncBuf
	cfg     config.Config
	cmdline string
	st      Stages
	to      Timeouts
}

func newFixture(t *testing.T) *fixture {
	f := &fixture{t: t, image: t.TempDir(), sys: t.TempDir(), out: &syncBuf{}, to: DefaultTimeouts}
	f.cfg = config.Config{
		Key:     config.Key{URLs: []string{"https://10.0.2.2:8443/v1/keys/{host}"}, Pins: []pin.Pin{{1}}},
		Root:    config.Root{Device: "PARTLABEL=root"},
		Volumes: []config.Volume{{Name: "data", Device: "PARTLABEL=data", Mount: "/srv"}},
	}
	f.uuid(testUUID)
	f.st = Stages{
		Modules: func(ctx context.Context, _ string, _ *Console) (string, error) { return "2 loaded", nil },
		Devices: func(ctx context.Context, cfg *config.Config, log ulog.Logger) (blockdev.BlockDev, []volumes.Prepared, error) {
			return blockdev.BlockDev{Path: "/dev/vda1", Content: blockdev.Content{Kind: blockdev.FileSystem, Format: "ext4"}},
				[]volumes.Prepared{{Spec: volumes.Spec{Name: "data"}, Dev: blockdev.BlockDev{Path: "/dev/vda2"}}}, nil
		},
		Network:  func(ctx context.Context, cfg netup.Config, log ulog.Logger) (Network, error) { return &fakeNet{}, nil },
		Identity: keys.Sources{SysRoot: f.sys, FileRoot: f.image},
		Fetch: func(ctx context.Context, cfg keys.Config, log ulog.Logger) (*keys.Keys, error) {
			return &keys.Keys{Keys: []*secret.Buf{secret.From([]byte("key-1"))}, Server: "10.0.2.2:8443"}, nil
		},
		Unlock: func(ctx context.Context, vols []volumes.Prepared, ks []*secret.Buf, _ volumes.Lifecycle, log ulog.Logger) ([]volumes.Opened, error) {
			var out []volumes.Opened
			for _, v := range vols {
				out = append(out, volumes.Opened{Spec: v.Spec, Path: "/dev/mapper/" + v.Spec.Name})
			}
			return out, nil
		},
		Swap:       func(string, ulog.Logger) error { return nil },
		Mount:      func(context.Context, string, sysroot.Mount, []sysroot.Mount) error { return nil },
		SwitchRoot: func(string, string, []string) error { return errSwitched },
		Refetch:    retry.Backoff{Base: time.Millisecond, Cap: time.Millisecond},
		Now:        time.Now,
		Sleep:      retry.Sleep,
	}
	return f
}

// uuid sets (or, with "", removes) the fixture's SMBIOS system UUID.
func (f *fixture) uuid(u string) {
	p := filepath.Join(f.sys, "sys/class/dmi/id/product_uuid")
	if u == "" {
		os.Remove(p)
		return
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		f.t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(strings.ToUpper(u)+"\n"), 0o644); err != nil {
		f.t.Fatal(err)
	}
}

// run boots the fixture and returns Run's error.
func (f *fixture) run(ctx context.Context) error {
	f.t.Helper()
	b, err := f.cfg.Embed()
	if err != nil {
		f.t.Fatal(err)
	}
	p := filepath.Join(f.image, layout.ConfigPath)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		f.t.Fatal(err)
	}
	if err := os.WriteFile(p, b, 0o644); err != nil {
		f.t.Fatal(err)
	}
	st := f.st
	err = Run(ctx, Options{ImageRoot: f.image, NewRoot: "/sysroot", Cmdline: f.cmdline,
		Console: NewConsole(f.out, nil), Timeouts: f.to, Stages: &st}, 0)
	f.t.Logf("console:\n%s", f.out)
	return err
}

func fatal(t *testing.T, err error) *Fatal {
	t.Helper()
	var fe *Fatal
	if !errors.As(err, &fe) {
		t.Fatalf("Run returned %v, want a *Fatal", err)
	}
	return fe
}

func TestBootSwitchesRoot(t *testing.T) {
	f := newFixture(t)
	err := f.run(t.Context())
	if fe := fatal(t, err); !errors.Is(fe, errSwitched) || fe.Reboot {
		t.Fatalf("err = %v, want the fake switch root's", err)
	}
	out := f.out.String()
	for _, want := range []string{
		"unlockrd: modules: 2 loaded (",
		"unlockrd: devices: root=/dev/vda1 data=/dev/vda2, LUKS2 headers valid (",
		"unlockrd: network: eth0 10.0.2.15/24 via dhcp (",
		"unlockrd: key: 1 key(s) for host " + testUUID + " from 10.0.2.2:8443 (",
		"unlockrd: volumes: data unlocked (",
		"unlockrd: mount: / (/dev/vda1), /srv (/dev/mapper/data) (",
		"unlockrd: cleanup: keys wiped, network removed\n",
		"unlockrd: switch root: exec /sbin/init (",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("console lacks %q", want)
		}
	}
}

// A modules-stage failure is reported at once: the network stage (whose
// deadline here is an hour) is stopped rather than waited for. On the old
// code the modules result was read only after the network stage, so this
// boot ended with the network's error after its deadline and never named
// the module.
func TestModuleFailureReportedBeforeNetworkDeadline(t *testing.T) {
	f := newFixture(t)
	f.to.Network = time.Hour
	f.st.Modules = func(ctx context.Context, _ string, _ *Console) (string, error) {
		return "", errors.New("virtio_net: Invalid module format")
	}
	networkEnded := make(chan error, 1)
	f.st.Network = func(ctx context.Context, cfg netup.Config, log ulog.Logger) (Network, error) {
		<-ctx.Done() // a NIC whose driver did not load never comes up
		networkEnded <- ctx.Err()
		return nil, fmt.Errorf("no link configured: %w", ctx.Err())
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	fe := fatal(t, f.run(ctx))
	if !strings.Contains(fe.Error(), "modules: virtio_net: Invalid module format") {
		t.Fatalf("fatal error %q does not name the module failure", fe)
	}
	if strings.Contains(fe.Error(), "network") {
		t.Errorf("fatal error %q blames the network, which was only stopped", fe)
	}
	if fe.Reboot {
		t.Errorf("a module failure reboots; it would fail again")
	}
	if err := <-networkEnded; !errors.Is(err, context.Canceled) {
		t.Errorf("network stage ended with %v, want it stopped (canceled), not timed out", err)
	}
}

// Every stage that has failed is in the fatal error, not only the first.
func TestFatalNamesEveryFailedStage(t *testing.T) {
	f := newFixture(t)
	modsFailed := make(chan struct{})
	f.st.Modules = func(ctx context.Context, _ string, _ *Console) (string, error) {
		defer close(modsFailed)
		return "", errors.New("dm_crypt: not found")
	}
	f.st.Devices = func(ctx context.Context, cfg *config.Config, log ulog.Logger) (blockdev.BlockDev, []volumes.Prepared, error) {
		<-modsFailed
		return blockdev.BlockDev{}, nil, errors.New("root: device not found: PARTLABEL=root")
	}
	f.st.Network = func(ctx context.Context, cfg netup.Config, log ulog.Logger) (Network, error) {
		<-ctx.Done()
		return nil, fmt.Errorf("no link configured: %w", ctx.Err())
	}
	fe := fatal(t, f.run(t.Context()))
	for _, want := range []string{"modules: dm_crypt: not found", "devices: root: device not found"} {
		if !strings.Contains(fe.Error(), want) {
			t.Errorf("fatal error %q lacks %q", fe, want)
		}
	}
	if strings.Contains(fe.Error(), "network") {
		t.Errorf("fatal error %q names the network, which was only stopped", fe)
	}
}

// DESIGN §6: no key is fetched before every header has been accepted, yet
// the header checks overlap the network bring-up. The fake devices stage
// finishes only once the network stage has started, and records whether a
// fetch came first.
func TestHeadersCheckedBeforeKeyFetched(t *testing.T) {
	f := newFixture(t)
	f.to.Devices = time.Hour
	var mu sync.Mutex
	devicesDone, fetchedEarly := false, false
	netStarted := make(chan struct{})
	network := f.st.Network
	f.st.Network = func(ctx context.Context, cfg netup.Config, log ulog.Logger) (Network, error) {
		close(netStarted)
		return network(ctx, cfg, log)
	}
	devices := f.st.Devices
	f.st.Devices = func(ctx context.Context, cfg *config.Config, log ulog.Logger) (blockdev.BlockDev, []volumes.Prepared, error) {
		select {
		case <-netStarted:
		case <-ctx.Done():
			return blockdev.BlockDev{}, nil, fmt.Errorf("headers not checked while the network came up: %w", ctx.Err())
		}
		root, vols, err := devices(ctx, cfg, log)
		mu.Lock()
		devicesDone = true
		mu.Unlock()
		return root, vols, err
	}
	fetch := f.st.Fetch
	f.st.Fetch = func(ctx context.Context, cfg keys.Config, log ulog.Logger) (*keys.Keys, error) {
		mu.Lock()
		fetchedEarly = !devicesDone
		mu.Unlock()
		return fetch(ctx, cfg, log)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	if fe := fatal(t, f.run(ctx)); !errors.Is(fe, errSwitched) {
		t.Fatalf("err = %v, want the boot to reach switch root", fe)
	}
	if fetchedEarly {
		t.Error("the key was fetched before the headers were accepted")
	}
	out := f.out.String()
	if d, k := strings.Index(out, "unlockrd: devices: "), strings.Index(out, "unlockrd: key: 1 key(s)"); d < 0 || k < d {
		t.Errorf("key line (at %d) before the devices line (at %d)", k, d)
	}
}

// A refused header ends the boot before any key is asked for: the key
// server never hands a key to a boot whose disk was tampered with.
func TestRefusedHeaderFetchesNoKey(t *testing.T) {
	f := newFixture(t)
	f.st.Devices = func(ctx context.Context, cfg *config.Config, log ulog.Logger) (blockdev.BlockDev, []volumes.Prepared, error) {
		return blockdev.BlockDev{}, nil, errors.New("volume data on /dev/vda2: LUKS header refused")
	}
	fetched := false
	f.st.Fetch = func(ctx context.Context, cfg keys.Config, log ulog.Logger) (*keys.Keys, error) {
		fetched = true
		return &keys.Keys{Keys: []*secret.Buf{secret.From([]byte("key-1"))}, Server: "10.0.2.2:8443"}, nil
	}
	fe := fatal(t, f.run(t.Context()))
	if fe.Reboot || !strings.Contains(fe.Error(), "devices: volume data on /dev/vda2: LUKS header refused") {
		t.Fatalf("err = %v, want a halt naming the refused header", fe)
	}
	if fetched {
		t.Error("a key was fetched although a header was refused")
	}
	if out := f.out.String(); strings.Contains(out, "unlockrd: key: 1 key") || strings.Contains(out, "unlockrd: volumes:") {
		t.Errorf("console suggests the boot went on past the refusal:\n%s", out)
	}
}

// The refetch loop ("no key opens the volume, fetching again") uses the
// one backoff policy and one give_up_after deadline counted from the first
// fetch: a host configured to give up does, and reboots. On the old code
// each refetch restarted give_up_after and the wait was a fixed 30–60 s
// sleep, so this boot never ended.
func TestRefetchGivesUpAndReboots(t *testing.T) {
	f := newFixture(t)
	f.cfg.Key.GiveUpAfter = config.Duration(5 * time.Minute)
	now := time.Unix(1e9, 0)
	var mu sync.Mutex
	f.st.Now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	var waits []time.Duration
	f.st.Sleep = func(ctx context.Context, d time.Duration) error {
		mu.Lock()
		now = now.Add(d)
		mu.Unlock()
		waits = append(waits, d)
		if len(waits) > 100 {
			return errors.New("refetched 100 times without giving up")
		}
		return ctx.Err()
	}
	f.st.Refetch = retry.Backoff{Base: time.Minute, Cap: time.Minute}
	var since []time.Time
	f.st.Fetch = func(ctx context.Context, cfg keys.Config, log ulog.Logger) (*keys.Keys, error) {
		since = append(since, cfg.Since)
		if cfg.GiveUpAfter != 5*time.Minute {
			t.Errorf("fetch got give_up_after %s", cfg.GiveUpAfter)
		}
		return &keys.Keys{Keys: []*secret.Buf{secret.From([]byte("old-key"))}, Server: "10.0.2.2:8443"}, nil
	}
	f.st.Unlock = func(ctx context.Context, vols []volumes.Prepared, ks []*secret.Buf, _ volumes.Lifecycle, log ulog.Logger) ([]volumes.Opened, error) {
		return nil, fmt.Errorf("volume data on /dev/vda2: %w (1 key tried on 1 keyslot); nothing was written to it", volumes.ErrNoKey)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	fe := fatal(t, f.run(ctx))
	if !fe.Reboot || !errors.Is(fe, keys.ErrGaveUp) {
		t.Fatalf("err = %v (reboot %v), want ErrGaveUp and a reboot", fe, fe.Reboot)
	}
	var total time.Duration
	for _, w := range waits {
		total += w
		if w < 30*time.Second || w > time.Minute {
			t.Errorf("refetch wait %s outside the backoff's [30s, 1m]", w)
		}
	}
	if total > 5*time.Minute || len(since) < 2 {
		t.Errorf("%d fetches, %s of waits: want several, within give_up_after", len(since), total)
	}
	for _, s := range since {
		if !s.Equal(since[0]) {
			t.Errorf("a refetch counted give_up_after from %v, not the first fetch (%v)", s, since[0])
		}
	}
	out := f.out.String()
	if !strings.Contains(out, "nothing was written to it; fetching the key again in ") || !strings.Contains(out, "nothing was written to it; giving up") {
		t.Errorf("console does not say it fetches again, then gives up")
	}
}

// The refetch wait ends with the context (the old one slept through it).
func TestRefetchWaitHonoursContext(t *testing.T) {
	f := newFixture(t)
	f.st.Refetch = retry.Backoff{Base: time.Hour, Cap: time.Hour}
	ctx, cancel := context.WithCancel(t.Context())
	f.st.Unlock = func(context.Context, []volumes.Prepared, []*secret.Buf, volumes.Lifecycle, ulog.Logger) ([]volumes.Opened, error) {
		cancel() // the host is told to stop while it waits
		return nil, volumes.ErrNoKey
	}
	fe := fatal(t, f.run(ctx))
	if !errors.Is(fe, context.Canceled) {
		t.Fatalf("err = %v, want the wait ended by the context", fe)
	}
}

// "cleanup: keys wiped" is true: by then the token and every key buffer
// fetched (including those of a fetch whose keys opened nothing) are zero.
func TestCleanupKeysWiped(t *testing.T) {
	f := newFixture(t)
	f.cmdline = "rd.unlockrd.token=s3cret-token"
	var held [][]byte
	var token []byte
	fetches := 0
	f.st.Fetch = func(ctx context.Context, cfg keys.Config, log ulog.Logger) (*keys.Keys, error) {
		fetches++
		token = cfg.Token
		a, b := []byte(fmt.Sprintf("key-%d-a", fetches)), []byte(fmt.Sprintf("key-%d-b", fetches))
		held = append(held, a, b)
		return &keys.Keys{Keys: []*secret.Buf{secret.From(a), secret.From(b)}, Server: "10.0.2.2:8443"}, nil
	}
	unlocks := 0
	f.st.Unlock = func(ctx context.Context, vols []volumes.Prepared, ks []*secret.Buf, _ volumes.Lifecycle, log ulog.Logger) ([]volumes.Opened, error) {
		unlocks++
		if unlocks == 1 {
			return nil, volumes.ErrNoKey
		}
		return []volumes.Opened{{Spec: vols[0].Spec, Path: "/dev/mapper/data"}}, nil
	}
	checked := false
	f.st.SwitchRoot = func(string, string, []string) error {
		checked = true
		if !strings.Contains(f.out.String(), "unlockrd: cleanup: keys wiped") {
			t.Errorf("no cleanup line before switch root")
		}
		if string(token) != strings.Repeat("\x00", len("s3cret-token")) {
			t.Errorf("token not wiped at switch root: %q", token)
		}
		for i, k := range held {
			if !bytes.Equal(k, make([]byte, len(k))) {
				t.Errorf("key buffer %d not wiped at switch root: %q", i, k)
			}
		}
		return errSwitched
	}
	if fe := fatal(t, f.run(t.Context())); !errors.Is(fe, errSwitched) {
		t.Fatalf("err = %v", fe)
	}
	if !checked || fetches != 2 || len(held) != 4 {
		t.Fatalf("switch root reached %v after %d fetches (%d buffers held)", checked, fetches, len(held))
	}
	if strings.Contains(f.out.String(), "s3cret-token") {
		t.Errorf("the token reached the console")
	}
}

// Issue 15 §3: with no {host} in any URL the host id is not needed, so a
// host without an SMBIOS UUID boots and nothing is said about it.
func TestStaticEndpointNeedsNoHostID(t *testing.T) {
	f := newFixture(t)
	f.uuid("")
	f.cfg.Key.URLs = []string{"https://10.0.2.2:8443/v1/key"}
	var host = "unset"
	fetch := f.st.Fetch
	f.st.Fetch = func(ctx context.Context, cfg keys.Config, log ulog.Logger) (*keys.Keys, error) {
		host = cfg.Host
		return fetch(ctx, cfg, log)
	}
	if fe := fatal(t, f.run(t.Context())); !errors.Is(fe, errSwitched) {
		t.Fatalf("err = %v, want the boot to reach switch root", fe)
	}
	if host != "" {
		t.Errorf("fetch got host %q", host)
	}
	out := f.out.String()
	if strings.Contains(out, "host id") {
		t.Errorf("console mentions the host id:\n%s", out)
	}
	if !strings.Contains(out, "unlockrd: key: 1 key(s) from 10.0.2.2:8443 (") {
		t.Errorf("no key line")
	}
}

// With {host} in a URL, a missing host id still halts the boot, naming
// every source tried.
func TestHostURLNeedsHostID(t *testing.T) {
	f := newFixture(t)
	f.uuid("")
	fe := fatal(t, f.run(t.Context()))
	if fe.Reboot || !strings.Contains(fe.Error(), "key: host id: no source gave one") {
		t.Fatalf("err = %v, want a halt naming the missing host id", fe)
	}
}

// A bad command-line override is reported and the configured value kept;
// warnings are printed.
func TestCmdlineReportsAndWarns(t *testing.T) {
	f := newFixture(t)
	f.cmdline = "ip=eth0:dhcpp rd.unlockrd.token=tok nameserver=10.0.0.53"
	var got netup.Config
	f.st.Network = func(ctx context.Context, cfg netup.Config, log ulog.Logger) (Network, error) {
		got = cfg
		return &fakeNet{}, nil
	}
	fatal(t, f.run(t.Context()))
	out := f.out.String()
	if !strings.Contains(out, `unlockrd: config: ip=eth0:dhcpp: method: "dhcpp" is not one of`) || !strings.Contains(out, "; keeping the configured value") {
		t.Errorf("bad ip= not reported")
	}
	if !strings.Contains(out, "unlockrd: warning: rd.unlockrd.token is readable by every user") {
		t.Errorf("no warning for the command-line token")
	}
	if len(got.Plan.Links) != 1 || got.Plan.Links[0].Values[0] != "dhcp" || len(got.Nameservers) != 1 || got.Nameservers[0].String() != "10.0.0.53" {
		t.Errorf("network got plan %+v, nameservers %v", got.Plan, got.Nameservers)
	}
}
