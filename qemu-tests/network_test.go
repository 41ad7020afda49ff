package qemutests

// Network bring-up under QEMU (issue 3). The VM's NICs are tap devices
// inside a network namespace that the test builds: there, the test runs
// the key server (and, where the test wants one, a real dnsmasq) and
// nothing else, so "no DHCP server" really means none, and the key is
// fetched over exactly the network the test describes. QEMU's user
// network is not used for these: it always answers DHCP.

import (
	"context"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/unlockrd/unlockrd/netboot/nstest"
	"github.com/unlockrd/unlockrd/qemu-tests/harness"
)

// vmNet is a namespace holding the VM's networks and the key server.
type vmNet struct {
	ns *nstest.NS
}

func newVMNet(t *testing.T) *vmNet {
	t.Helper()
	ns, err := nstest.New("vmnet")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	return &vmNet{ns: ns}
}

// tap makes a tap device for one VM NIC, with the server side's
// addresses (no duplicate address detection: the server side is not
// under test).
func (v *vmNet) tap(t *testing.T, name string, addrs ...string) *os.File {
	t.Helper()
	f, err := v.ns.Tap(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	for _, a := range addrs {
		args := []string{"addr", "add", a, "dev", name}
		if strings.Contains(a, ":") {
			args = append(args, "nodad")
		}
		if err := v.ns.IP(args...); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.ns.IP("link", "set", name, "up"); err != nil {
		t.Fatal(err)
	}
	return f
}

func (v *vmNet) dnsmasq(t *testing.T, args ...string) *nstest.Dnsmasq {
	t.Helper()
	d, err := v.ns.StartDnsmasq(args...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		d.Stop()
		t.Logf("dnsmasq log:\n%s", d.Logs())
	})
	return d
}

// keyServer starts the skeleton's key server inside the namespace on
// port 8443 of every address there.
func (v *vmNet) keyServer(t *testing.T, ctx context.Context, s *skeleton) {
	t.Helper()
	err := v.ns.Do(func() error {
		srv, err := harness.StartKeyServer(ctx, s.bins.KeyServer, s.data, ":8443", testLog{t})
		s.server = srv
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.server.Stop)
}

// assertClean checks, from the real root's test init, that the link has
// no address and is down: teardown left the real OS a clean state.
func assertClean(t *testing.T, rep *harness.Report, links ...string) {
	t.Helper()
	for _, name := range links {
		addrs, ok := rep.LinkAddrs(name)
		if !ok {
			t.Errorf("the test init saw no link %s: %q", name, rep.Links)
			continue
		}
		if len(addrs) > 0 {
			t.Errorf("%s still has %v after switch root; want no address (teardown)", name, addrs)
		}
		if flags := linkFlags(rep, name); slices.Contains(flags, "up") {
			t.Errorf("%s is still up after switch root (flags %v)", name, flags)
		}
	}
	for _, r := range rep.Routes {
		for _, name := range links {
			if strings.HasPrefix(r, name+" ") {
				t.Errorf("route %q remains after switch root", r)
			}
		}
	}
}

func linkFlags(rep *harness.Report, name string) []string {
	for _, l := range rep.Links {
		f := strings.Fields(l)
		if len(f) < 2 || f[0] != name {
			continue
		}
		for _, a := range f[1:] {
			if v, ok := strings.CutPrefix(a, "flags="); ok {
				return strings.Split(v, "|")
			}
		}
	}
	return nil
}

// (a) A static ip= on a network without any DHCP server; keep-network
// leaves the address to the real root.
func TestNetworkStaticIPWithoutDHCP(t *testing.T) {
	ctx := t.Context()
	s := newSkeleton(t, ctx)
	v := newVMNet(t)
	tap := v.tap(t, "tap0", "10.88.0.1/24")
	v.keyServer(t, ctx, s)
	img := s.image(t, ctx, harness.ImageConfig{URLs: []string{"https://10.88.0.1:8443/v1/keys/{host}"}})
	opts := s.vmOptions(img)
	opts.Network = harness.NIC{Tap: tap, MAC: "52:54:00:88:00:02"}
	opts.Append = []string{"ip=10.88.0.2::10.88.0.1:255.255.255.0:unlock-static:eth0:none", "rd.unlockrd.keep-network"}
	vm := harness.StartVM(t, opts)

	vm.ExpectLine(`^unlockrd: network: eth0: static 10\.88\.0\.2/24 gw 10\.88\.0\.1, host name unlock-static; configured first, keeping it \(ip=10\.88\.0\.2::.*:eth0:none\) \(link up to configured [0-9.]+s\)$`, stageTimeout)
	vm.ExpectLine(`^unlockrd: network: eth0 10\.88\.0\.2/24 via static \([0-9.]+s\)$`, stageTimeout)
	vm.ExpectLine(`^unlockrd: key: 1 key\(s\) for host `+regexp.QuoteMeta(s.uuid)+` from 10\.88\.0\.1:8443 `, stageTimeout)
	vm.ExpectLine(`^unlockrd: cleanup: keys wiped, network kept$`, stageTimeout)
	rep := vm.ExpectReport(bootTimeout)
	if f, ok := rep.Files[harness.HelloPath]; !ok || f.SHA256 != s.fx.HelloSHA256() {
		t.Errorf("data volume not unlocked and mounted: %+v", f)
	}
	if addrs, _ := rep.LinkAddrs("eth0"); !slices.Contains(addrs, "10.88.0.2/24") {
		t.Errorf("eth0 addresses %v after switch root; want 10.88.0.2/24 kept (keep-network)", addrs)
	}
	if !slices.Contains(rep.Routes, "eth0 0.0.0.0/0 gw=10.88.0.1") {
		t.Errorf("routes %q; want the default route kept", rep.Routes)
	}
	if l, ok := vm.Find(`DHCP`); ok {
		t.Errorf("a static ip= used DHCP: %s", l.Text)
	}
	vm.Wait(bootTimeout)
}

// (b) Two NICs: the first has carrier but no DHCP server, the second has
// dnsmasq. Both are raced; the boot goes through the second, the first is
// set down, and teardown leaves both clean. The key URL names the server
// by a DNS name that only the DHCP-announced DNS server (the same dnsmasq)
// resolves: the key fetch works only if DHCP's DNS reached resolv.conf.
func TestNetworkTwoNICsFirstWithoutDHCP(t *testing.T) {
	ctx := t.Context()
	s := newSkeleton(t, ctx)
	v := newVMNet(t)
	tap0 := v.tap(t, "tap0", "10.89.0.1/24")
	tap1 := v.tap(t, "tap1", "10.89.1.1/24")
	dns := v.dnsmasq(t, "--interface=tap1", "--dhcp-range=10.89.1.50,10.89.1.99,255.255.255.0,1h",
		"--dhcp-option=option:router,10.89.1.1", "--dhcp-option=option:dns-server,10.89.1.1",
		"--dhcp-option=option:domain-search,unlock.test",
		"--port=53", "--no-resolv", "--no-hosts", "--log-queries", "--address=/keys.unlock.test/10.89.1.1")
	v.keyServer(t, ctx, s)
	img := s.image(t, ctx, harness.ImageConfig{URLs: []string{"https://keys.unlock.test:8443/v1/keys/{host}"}})
	opts := s.vmOptions(img)
	opts.Network = harness.NIC{Tap: tap0, MAC: "52:54:00:89:00:02"}
	opts.ExtraNICs = []harness.NIC{{Tap: tap1, MAC: "52:54:00:89:01:02"}}
	vm := harness.StartVM(t, opts)

	win := vm.ExpectSubmatch(`^unlockrd: network: eth1 (10\.89\.1\.[0-9]+)/24 via dhcp \(([0-9.]+)s\)$`, stageTimeout)
	t.Logf("network stage through the second NIC: %ss (lease %s)", win[2], win[1])
	if _, ok := vm.Find(`^unlockrd: network: eth1: dhcp 10\.89\.1\.[0-9]+/24 gw 10\.89\.1\.1 from 10\.89\.1\.1 lease 1h0m0s, dns 10\.89\.1\.1, search unlock\.test; configured first, keeping it \(default: DHCP on every Ethernet link\)`); !ok {
		t.Errorf("no line for eth1 saying what it got and why")
	}
	if _, ok := vm.Find(`^unlockrd: network: eth0: eth1 was configured first \(this link: DHCPv4: no lease after [0-9]+ message\(s\) in [0-9.]+s \(no answer\)\); set down$`); !ok {
		t.Errorf("no line for eth0 saying it lost the race and was set down")
	}
	vm.ExpectLine(`^unlockrd: key: 1 key\(s\) for host `+regexp.QuoteMeta(s.uuid)+` from keys\.unlock\.test:8443 `, stageTimeout)
	vm.ExpectLine(`^unlockrd: cleanup: keys wiped, network removed$`, stageTimeout)
	rep := vm.ExpectReport(bootTimeout)
	if f, ok := rep.Files[harness.HelloPath]; !ok || f.SHA256 != s.fx.HelloSHA256() {
		t.Errorf("data volume not unlocked and mounted: %+v", f)
	}
	assertClean(t, rep, "eth0", "eth1")
	vm.Wait(bootTimeout)
	if !regexp.MustCompile(`query\[A+\] keys\.unlock\.test from 10\.89\.1\.`).MatchString(dns.Logs()) {
		t.Errorf("the guest never asked the DHCP-announced DNS server for keys.unlock.test")
	}
}

// (c) IPv6 only: the namespace has no IPv4 at all; dnsmasq sends router
// advertisements (with a DNS server) and network.ip in the image says
// auto6. The key is fetched over IPv6, as the server's log shows.
func TestNetworkIPv6Only(t *testing.T) {
	ctx := t.Context()
	s := newSkeleton(t, ctx)
	v := newVMNet(t)
	tap := v.tap(t, "tap0", "fd00:90::1/64")
	v.dnsmasq(t, "--interface=tap0", "--enable-ra", "--dhcp-range=fd00:90::,ra-only,64,1h",
		"--dhcp-option=option6:dns-server,[fd00:90::53]")
	v.keyServer(t, ctx, s)
	img := s.image(t, ctx, harness.ImageConfig{URLs: []string{"https://[fd00:90::1]:8443/v1/keys/{host}"},
		Extra: "network:\n  ip: auto6\n"})
	opts := s.vmOptions(img)
	opts.Network = harness.NIC{Tap: tap, MAC: "52:54:00:90:00:02"}
	vm := harness.StartVM(t, opts)

	vm.ExpectLine(`^unlockrd: network: eth0: auto6 fd00:90::5054:ff:fe90:2/64 \(unique-local\) gw fe80::[0-9a-f:]+, dns fd00:90::53; configured first, keeping it \(ip=auto6\)`, stageTimeout)
	vm.ExpectLine(`^unlockrd: network: eth0 fd00:90::5054:ff:fe90:2/64 via auto6 \([0-9.]+s\)$`, stageTimeout)
	vm.ExpectLine(`^unlockrd: key: 1 key\(s\) for host `+regexp.QuoteMeta(s.uuid)+` from \[fd00:90::1\]:8443 `, stageTimeout)
	rep := vm.ExpectReport(bootTimeout)
	if f, ok := rep.Files[harness.HelloPath]; !ok || f.SHA256 != s.fx.HelloSHA256() {
		t.Errorf("data volume not unlocked and mounted: %+v", f)
	}
	assertClean(t, rep, "eth0")
	vm.Wait(bootTimeout)
	if logs := s.server.Logs(); !strings.Contains(logs, `"remote":"[fd00:90::5054:ff:fe90:2]:`) {
		t.Errorf("the key server did not see the request come from the guest's IPv6 address:\n%s", logs)
	}
}

// A link name that does not exist is reported and replaced by DHCP on
// every link, without waiting for it until the link deadline.
func TestNetworkUnknownLinkFallsBackToDHCP(t *testing.T) {
	ctx := t.Context()
	s := newSkeleton(t, ctx)
	s.start(t, ctx)
	img := s.image(t, ctx, harness.ImageConfig{})
	opts := s.vmOptions(img)
	opts.Append = []string{"ip=eth7:dhcp"}
	vm := harness.StartVM(t, opts)
	vm.ExpectLine(`^unlockrd: network: ip=eth7:dhcp: no link eth7 \(Ethernet links: eth0\); falling back to DHCP on every link$`, stageTimeout)
	vm.ExpectLine(`^unlockrd: network: eth0 10\.0\.2\.15/24 via dhcp \([0-9.]+s\)$`, stageTimeout)
	rep := vm.ExpectReport(bootTimeout)
	if f, ok := rep.Files[harness.HelloPath]; !ok || f.SHA256 != s.fx.HelloSHA256() {
		t.Errorf("data volume not unlocked and mounted: %+v", f)
	}
	assertClean(t, rep, "eth0")
	vm.Wait(bootTimeout)
}
