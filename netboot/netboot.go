// Package netboot is boot stage 4: it brings up the network the key fetch
// needs, and (stage 8) takes down what it configured so the real OS starts
// from a clean state.
package netboot

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
)

// Logger receives progress lines.
type Logger interface {
	Printf(format string, v ...any)
}

// Config is what stage 4 needs from the configuration.
type Config struct {
	// IP holds ip= values (dracut/klibc forms); empty means "dhcp".
	IP []string
	// Nameservers from nameserver= are added to the DHCP ones.
	Nameservers []string
	// LinkTimeout bounds the wait for an Ethernet link to appear and get
	// carrier.
	LinkTimeout time.Duration
	// ResolvConf is the file DNS settings are written to.
	ResolvConf string
}

// Result is the configured network.
type Result struct {
	Link    string
	Addr    netip.Prefix
	Gateway netip.Addr
	Method  string
	DNS     []netip.Addr

	link   netlink.Link
	addrs  []*netlink.Addr
	routes []*netlink.Route
}

// String is the stage line: "eth0 10.0.2.15/24 via dhcp".
func (r *Result) String() string {
	return fmt.Sprintf("%s %s via %s", r.Link, r.Addr, r.Method)
}

// Up configures the network according to cfg. It returns once one link has
// an address (and default route, when the server gave one).
func Up(ctx context.Context, cfg Config, log Logger) (*Result, error) {
	if cfg.LinkTimeout == 0 {
		cfg.LinkTimeout = 30 * time.Second
	}
	if cfg.ResolvConf == "" {
		cfg.ResolvConf = "/etc/resolv.conf"
	}
	mode := "dhcp"
	if len(cfg.IP) > 0 {
		mode = cfg.IP[0]
	}
	switch mode {
	case "dhcp", "on", "any":
	default:
		return nil, fmt.Errorf("ip=%s: only DHCPv4 is supported by this build", mode)
	}
	if err := loUp(); err != nil {
		return nil, err
	}
	link, err := waitEthernet(ctx, cfg.LinkTimeout)
	if err != nil {
		return nil, err
	}
	res, err := dhcp4(ctx, link, log)
	if err != nil {
		return nil, err
	}
	for _, s := range cfg.Nameservers {
		if a, err := netip.ParseAddr(s); err == nil {
			res.DNS = append(res.DNS, a)
		} else {
			log.Printf("nameserver=%s: not an IP address, ignored", s)
		}
	}
	if len(res.DNS) > 0 {
		if err := writeResolvConf(cfg.ResolvConf, res.DNS); err != nil {
			return nil, err
		}
	}
	return res, nil
}

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

// waitEthernet waits for the first Ethernet link (drivers register their
// links asynchronously after the module loads), sets it up and waits for
// carrier.
func waitEthernet(ctx context.Context, timeout time.Duration) (netlink.Link, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var link netlink.Link
	for link == nil {
		links, err := netlink.LinkList()
		if err != nil {
			return nil, fmt.Errorf("list links: %w", err)
		}
		for _, l := range links {
			if isEthernet(l) {
				link = l
				break
			}
		}
		if link != nil {
			break
		}
		if err := sleep(ctx, 20*time.Millisecond); err != nil {
			return nil, fmt.Errorf("no Ethernet link appeared within %s (links: %s)", timeout, linkNames(links))
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return nil, fmt.Errorf("%s: set up: %w", link.Attrs().Name, err)
	}
	for {
		l, err := netlink.LinkByIndex(link.Attrs().Index)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", link.Attrs().Name, err)
		}
		if l.Attrs().OperState == netlink.OperUp || l.Attrs().RawFlags&unixIFFLowerUp != 0 {
			return l, nil
		}
		if err := sleep(ctx, 20*time.Millisecond); err != nil {
			return nil, fmt.Errorf("%s: no carrier within %s", link.Attrs().Name, timeout)
		}
	}
}

const unixIFFLowerUp = 0x10000

func isEthernet(l netlink.Link) bool {
	a := l.Attrs()
	if a == nil || len(a.HardwareAddr) != 6 || a.Flags&net.FlagLoopback != 0 {
		return false
	}
	// Physical and virtio NICs are "device"; skip bridges, vlans, tunnels.
	return l.Type() == "device"
}

func linkNames(ls []netlink.Link) string {
	var n []string
	for _, l := range ls {
		n = append(n, l.Attrs().Name)
	}
	if len(n) == 0 {
		return "none"
	}
	return strings.Join(n, ", ")
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func writeResolvConf(path string, dns []netip.Addr) error {
	var b strings.Builder
	for _, a := range dns {
		fmt.Fprintf(&b, "nameserver %s\n", a)
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// Teardown removes the routes and addresses Up added and sets the link
// down, so the real OS configures its network from a clean state.
func (r *Result) Teardown() error {
	if r == nil || r.link == nil {
		return nil
	}
	var errs []error
	for _, rt := range r.routes {
		if err := netlink.RouteDel(rt); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("%s: delete route %s: %w", r.Link, rt, err))
		}
	}
	for _, a := range r.addrs {
		if err := netlink.AddrDel(r.link, a); err != nil {
			errs = append(errs, fmt.Errorf("%s: delete address %s: %w", r.Link, a.IPNet, err))
		}
	}
	if err := netlink.LinkSetDown(r.link); err != nil {
		errs = append(errs, fmt.Errorf("%s: set down: %w", r.Link, err))
	}
	return errors.Join(errs...)
}
