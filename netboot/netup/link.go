package netup

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/retry"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func loUp() error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		return fmt.Errorf("loopback up: %w", err)
	}
	return nil
}

// isEthernet reports whether l is an Ethernet NIC. Physical and virtio
// NICs are "device"; veth pairs (what the namespace tests use, never
// present in an initramfs unless made on purpose) count too. Bridges,
// VLANs, bonds and tunnels are not links to race.
func isEthernet(l netlink.Link) bool {
	a := l.Attrs()
	if a == nil || len(a.HardwareAddr) != 6 || a.Flags&net.FlagLoopback != 0 || a.EncapType != "ether" {
		return false
	}
	return l.Type() == "device" || l.Type() == "veth"
}

// waitCarrier waits until the link has carrier (IFF_LOWER_UP) and can
// send: until the kernel attaches the link's transmit queue discipline
// (at once when the link comes up with carrier, else in a deferred step
// that also sets IFF_RUNNING and is rate-limited to once a second) it
// drops what is sent, such as a first DHCP DISCOVER, which would then
// cost a retransmission.
func waitCarrier(ctx context.Context, a *applied, timeout time.Duration) error {
	start := time.Now()
	for {
		l, err := netlink.LinkByIndex(a.index)
		if err != nil {
			return fmt.Errorf("link vanished: %w", err)
		}
		if f := l.Attrs().RawFlags; f&unix.IFF_LOWER_UP != 0 && (f&unix.IFF_RUNNING != 0 || txReady(l)) {
			return nil
		}
		if time.Since(start) >= timeout {
			return fmt.Errorf("no carrier within %s", timeout)
		}
		if err := retry.Sleep(ctx, 10*time.Millisecond); err != nil {
			return fmt.Errorf("no carrier yet after %.2fs: %w", time.Since(start).Seconds(), err)
		}
	}
}

// txReady reports whether the link's root queue discipline is attached:
// "noop" is the placeholder that drops everything.
func txReady(l netlink.Link) bool {
	qs, err := netlink.QdiscList(l)
	if err != nil {
		return false
	}
	for _, q := range qs {
		if q.Attrs().Parent == netlink.HANDLE_ROOT && q.Type() != "noop" {
			return true
		}
	}
	return false
}

// validDomain accepts a DNS name made of letters, digits, hyphens and
// underscores: what the network hands us ends up in resolv.conf and the
// host name, where a space or newline would inject configuration.
func validDomain(s string) bool {
	s = strings.TrimSuffix(s, ".")
	if s == "" || len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" || len(label) > 63 {
			return false
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
				return false
			}
		}
	}
	return true
}

// applied records every change made to one link, so that undo puts the
// link back exactly as it was: routes and addresses we added removed, the
// link set down if we set it up, MAC address, MTU and sysctls restored.
// Addresses the kernel made itself (IPv6 link-local, SLAAC) go away when
// the link goes down.
type applied struct {
	index int
	name  string
	link  netlink.Link

	mu      sync.Mutex
	setUp   bool
	oldMTU  int
	oldMAC  net.HardwareAddr
	addrs   []*netlink.Addr
	routes  []*netlink.Route
	sysctls []sysctl
}

type sysctl struct{ path, old string }

func newApplied(l netlink.Link) *applied {
	return &applied{index: l.Attrs().Index, name: l.Attrs().Name, link: l}
}

func (a *applied) up() error {
	l, err := netlink.LinkByIndex(a.index)
	if err != nil {
		return fmt.Errorf("link vanished: %w", err)
	}
	if l.Attrs().Flags&net.FlagUp != 0 {
		return nil
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return fmt.Errorf("set up: %w", err)
	}
	a.mu.Lock()
	a.setUp = true
	a.mu.Unlock()
	return nil
}

func (a *applied) setMAC(mac net.HardwareAddr) error {
	old := slices.Clone(a.link.Attrs().HardwareAddr)
	if slices.Equal(old, mac) {
		return nil
	}
	if err := netlink.LinkSetHardwareAddr(a.link, mac); err != nil {
		return fmt.Errorf("set MAC address %s: %w", mac, err)
	}
	a.mu.Lock()
	a.oldMAC = old
	a.mu.Unlock()
	return nil
}

func (a *applied) setMTU(mtu int) error {
	old := a.link.Attrs().MTU
	if old == mtu {
		return nil
	}
	if err := netlink.LinkSetMTU(a.link, mtu); err != nil {
		return fmt.Errorf("set MTU %d: %w", mtu, err)
	}
	a.mu.Lock()
	a.oldMTU = old
	a.mu.Unlock()
	return nil
}

// enableIPv6 makes sure the link does IPv6 and, for SLAAC, accepts router
// advertisements and configures addresses from them (the kernel's
// defaults), and turns on optimistic duplicate address detection (RFC
// 4429): an address is usable while DAD runs, which saves 1-2 s per
// address. Changes are recorded and undone.
func (a *applied) enableIPv6(slaac bool) error {
	want := map[string]string{"disable_ipv6": "0", "optimistic_dad": "1", "use_optimistic": "1"}
	if slaac {
		want["accept_ra"] = "1"
		want["autoconf"] = "1"
	}
	for _, k := range []string{"disable_ipv6", "accept_ra", "autoconf", "optimistic_dad", "use_optimistic"} {
		v, ok := want[k]
		if !ok {
			continue
		}
		p := filepath.Join("/proc/sys/net/ipv6/conf", a.name, k)
		b, err := os.ReadFile(p)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) && (k == "optimistic_dad" || k == "use_optimistic") {
				continue // a kernel without CONFIG_IPV6_OPTIMISTIC_DAD
			}
			return fmt.Errorf("IPv6: %w", err)
		}
		old := strings.TrimSpace(string(b))
		if old == v || (k == "accept_ra" && old == "2") {
			continue
		}
		if err := os.WriteFile(p, []byte(v), 0o644); err != nil {
			return fmt.Errorf("IPv6: %w", err)
		}
		a.mu.Lock()
		a.sysctls = append(a.sysctls, sysctl{p, old})
		a.mu.Unlock()
	}
	return nil
}

// addAddr adds an address and records it. An address that is already
// there is an error: removing it later would remove someone else's. IPv6
// addresses are optimistic (see enableIPv6) where the kernel allows it.
func (a *applied) addAddr(addr *netlink.Addr) error {
	if addr.IP.To4() == nil {
		opt := *addr
		opt.Flags |= unix.IFA_F_OPTIMISTIC
		if err := netlink.AddrAdd(a.link, &opt); err == nil {
			a.mu.Lock()
			a.addrs = append(a.addrs, &opt)
			a.mu.Unlock()
			return nil
		}
	}
	if err := netlink.AddrAdd(a.link, addr); err != nil {
		return fmt.Errorf("add address %s: %w", addr.IPNet, err)
	}
	a.mu.Lock()
	a.addrs = append(a.addrs, addr)
	a.mu.Unlock()
	return nil
}

func (a *applied) addRoute(r *netlink.Route) error {
	if err := netlink.RouteAdd(r); err != nil {
		return fmt.Errorf("add route %s: %w", routeString(r), err)
	}
	a.mu.Lock()
	a.routes = append(a.routes, r)
	a.mu.Unlock()
	return nil
}

func (a *applied) ours(ip net.IP) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.ContainsFunc(a.addrs, func(x *netlink.Addr) bool { return x.IP.Equal(ip) })
}

func routeString(r *netlink.Route) string {
	dst := "default"
	if r.Dst != nil {
		dst = r.Dst.String()
	}
	if r.Gw != nil {
		return dst + " via " + r.Gw.String()
	}
	return dst + " on-link"
}

// undo reverts every recorded change, newest first.
func (a *applied) undo() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	var errs []error
	for i := len(a.routes) - 1; i >= 0; i-- {
		if err := netlink.RouteDel(a.routes[i]); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("delete route %s: %w", routeString(a.routes[i]), err))
		}
	}
	for i := len(a.addrs) - 1; i >= 0; i-- {
		if err := netlink.AddrDel(a.link, a.addrs[i]); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			errs = append(errs, fmt.Errorf("delete address %s: %w", a.addrs[i].IPNet, err))
		}
	}
	if a.setUp {
		if err := netlink.LinkSetDown(a.link); err != nil {
			errs = append(errs, fmt.Errorf("set down: %w", err))
		}
	}
	if a.oldMAC != nil {
		if err := netlink.LinkSetHardwareAddr(a.link, a.oldMAC); err != nil {
			errs = append(errs, fmt.Errorf("restore MAC address %s: %w", a.oldMAC, err))
		}
	}
	if a.oldMTU != 0 {
		if err := netlink.LinkSetMTU(a.link, a.oldMTU); err != nil {
			errs = append(errs, fmt.Errorf("restore MTU %d: %w", a.oldMTU, err))
		}
	}
	for i := len(a.sysctls) - 1; i >= 0; i-- {
		s := a.sysctls[i]
		if err := os.WriteFile(s.path, []byte(s.old), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("restore %s: %w", s.path, err))
		}
	}
	a.routes, a.addrs, a.sysctls = nil, nil, nil
	a.setUp, a.oldMAC, a.oldMTU = false, nil, 0
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%s: %w", a.name, err)
	}
	return nil
}

// addrNetlink turns a prefix into a netlink address with lifetimes
// (0 = forever).
func addrNetlink(p netip.Prefix, valid, preferred time.Duration) *netlink.Addr {
	a := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
	if valid > 0 && valid < time.Duration(1<<31)*time.Second {
		a.ValidLft = int(valid.Seconds())
		a.PreferedLft = int(min(preferred, valid).Seconds())
	}
	return a
}

// waitDAD waits until ip can be used as a source: duplicate address
// detection has passed or the address is optimistic.
func waitDAD(ctx context.Context, a *applied, ip netip.Addr) error {
	for {
		addrs, err := netlink.AddrList(a.link, netlink.FAMILY_V6)
		if err != nil {
			return fmt.Errorf("list addresses: %w", err)
		}
		found := false
		for _, x := range addrs {
			if y, ok := netip.AddrFromSlice(x.IP); !ok || y.Unmap() != ip {
				continue
			}
			found = true
			if x.Flags&unix.IFA_F_DADFAILED != 0 {
				return fmt.Errorf("%s is in use by another host (duplicate address detection failed)", ip)
			}
			if usable6(x.Flags) {
				return nil
			}
		}
		if !found {
			return fmt.Errorf("address %s vanished", ip)
		}
		if err := retry.Sleep(ctx, 20*time.Millisecond); err != nil {
			return fmt.Errorf("%s: duplicate address detection unfinished: %w", ip, err)
		}
	}
}

// usable6 reports whether an IPv6 address with these flags can be used as
// a source: duplicate address detection has passed, or the address is
// optimistic.
func usable6(flags int) bool {
	return flags&unix.IFA_F_DADFAILED == 0 && (flags&unix.IFA_F_TENTATIVE == 0 || flags&unix.IFA_F_OPTIMISTIC != 0)
}

// fileBackup is a file's content before we wrote it.
type fileBackup struct {
	path   string
	data   []byte
	absent bool
}

func backupFile(path string) (*fileBackup, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return &fileBackup{path: path, absent: true}, nil
	}
	if err != nil {
		return nil, err
	}
	return &fileBackup{path: path, data: b}, nil
}

func (f *fileBackup) restore() error {
	if f.absent {
		if err := os.Remove(f.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	}
	return os.WriteFile(f.path, f.data, 0o644)
}

// writeResolvConf writes the servers and search domains Go's resolver and
// libc read.
func writeResolvConf(path string, dns []netip.Addr, search []string) error {
	var b strings.Builder
	b.WriteString("# written by unlockrd's network stage\n")
	for _, a := range dns {
		fmt.Fprintf(&b, "nameserver %s\n", a)
	}
	if len(search) > 0 {
		fmt.Fprintf(&b, "search %s\n", strings.Join(search, " "))
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
