package netup

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/retry"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/dhcpv4/nclient4"
	"github.com/unlockrd/unlockrd/netboot/ipconf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// dhcp4 obtains a lease on the link and configures it. The client
// retransmits each message with the same transaction id and a timeout
// that doubles from 1 s, so that a late answer still counts: servers that
// ping an address before offering it (dnsmasq, ISC dhcpd) answer the
// first DISCOVER only after a few seconds. A refusal (NAK) or an error
// starts over after a short backoff. It goes on until ctx ends.
func (u *upper) dhcp4(ctx context.Context, a *applied, spec ipconf.Link) (*methodResult, error) {
	lg := &dhcp4Log{u: u, link: a.name}
	c, err := nclient4.New(a.name, nclient4.WithTimeout(time.Second), nclient4.WithRetry(-1), nclient4.WithLogger(lg))
	if err != nil {
		return nil, fmt.Errorf("DHCPv4 client: %w", err)
	}
	defer c.Close()
	mods := []dhcpv4.Modifier{dhcpv4.WithRequestedOptions(
		dhcpv4.OptionSubnetMask, dhcpv4.OptionRouter, dhcpv4.OptionClasslessStaticRoute,
		dhcpv4.OptionDomainNameServer, dhcpv4.OptionDomainName, dhcpv4.OptionDNSDomainSearchList,
		dhcpv4.OptionHostName,
	)}
	if spec.Hostname != "" {
		mods = append(mods, dhcpv4.WithOption(dhcpv4.OptHostName(spec.Hostname)))
	}
	start := time.Now()
	var lease *nclient4.Lease
	for attempt := 1; ; attempt++ {
		lease, err = c.Request(ctx, mods...)
		if err == nil {
			break
		}
		last := err.Error()
		var nak *nclient4.ErrNak
		switch {
		case errors.As(err, &nak):
			last = "server refused the request (NAK)"
		case ctx.Err() != nil:
			last = "no answer"
		}
		fail := func(err error) error {
			return fmt.Errorf("DHCPv4: no lease after %d message(s) in %.1fs (%s): %w", lg.sent.Load(), time.Since(start).Seconds(), last, err)
		}
		if ctx.Err() != nil {
			return nil, fail(ctx.Err())
		}
		u.debugf("%s: DHCPv4: %s; starting over", a.name, last)
		if err := retry.Sleep(ctx, retry.Backoff{Base: 500 * time.Millisecond, Cap: 4 * time.Second}.Delay(attempt-1)); err != nil {
			return nil, fail(err)
		}
	}
	u.debugf("%s: DHCPv4: %s acknowledged by %s after %.2fs", a.name, lease.ACK.YourIPAddr, lease.ACK.ServerIdentifier(), time.Since(start).Seconds())
	l, err := parseLease4(lease.ACK)
	if err != nil {
		return nil, fmt.Errorf("DHCPv4: unusable lease from %s: %w", lease.ACK.ServerIdentifier(), err)
	}
	return u.apply4(a, l)
}

// dhcp4Log counts the messages the client sends and logs them in debug
// mode.
type dhcp4Log struct {
	u    *upper
	link string
	sent atomic.Int32
}

func (l *dhcp4Log) Printf(string, ...any) {}

func (l *dhcp4Log) PrintMessage(prefix string, m *dhcpv4.DHCPv4) {
	if prefix == "sent message" {
		n := l.sent.Add(1)
		l.u.debugf("%s: DHCPv4: sent %s (message %d)", l.link, m.MessageType(), n)
	}
}

// lease4 is what a DHCPv4 acknowledgement configures.
type lease4 struct {
	addr     netip.Prefix
	routes   []route4
	dns      []netip.Addr
	search   []string
	hostname string
	server   netip.Addr
	lease    time.Duration
}

// route4 is one route; an invalid gw means on-link.
type route4 struct {
	dst netip.Prefix
	gw  netip.Addr
}

func (r route4) String() string {
	dst := r.dst.String()
	if r.dst.Bits() == 0 {
		dst = "default"
	}
	if !r.gw.IsValid() {
		return dst + " on-link"
	}
	return dst + " via " + r.gw.String()
}

// parseLease4 reads an ACK. Classless static routes (option 121), when
// present, replace the router option, as RFC 3442 requires. Names that
// would not be safe in resolv.conf or as a host name are dropped.
func parseLease4(ack *dhcpv4.DHCPv4) (lease4, error) {
	var l lease4
	yi, ok := netip.AddrFromSlice(ack.YourIPAddr.To4())
	if !ok || !usable4(yi) {
		return l, fmt.Errorf("offered address %v is not a unicast address", ack.YourIPAddr)
	}
	bits := 0
	if m := ack.SubnetMask(); m != nil {
		if ones, size := m.Size(); size == 32 && ones > 0 {
			bits = ones
		}
	}
	if bits == 0 {
		bits, _ = net.IP(yi.AsSlice()).DefaultMask().Size()
	}
	l.addr = netip.PrefixFrom(yi, bits)
	if rs := ack.ClasslessStaticRoute(); len(rs) > 0 {
		for _, r := range rs {
			dst, ok1 := netip.AddrFromSlice(r.Dest.IP.To4())
			gw, ok2 := netip.AddrFromSlice(r.Router.To4())
			ones, _ := r.Dest.Mask.Size()
			if !ok1 || !ok2 {
				continue
			}
			rt := route4{dst: netip.PrefixFrom(dst, ones).Masked()}
			if !gw.IsUnspecified() {
				if !usable4(gw) {
					continue
				}
				rt.gw = gw
			}
			if !slices.Contains(l.routes, rt) {
				l.routes = append(l.routes, rt)
			}
		}
	} else {
		for _, r := range ack.Router() {
			if gw, ok := netip.AddrFromSlice(r.To4()); ok && usable4(gw) && gw != yi {
				l.routes = []route4{{dst: netip.PrefixFrom(netip.IPv4Unspecified(), 0), gw: gw}}
				break
			}
		}
	}
	for _, d := range ack.DNS() {
		if a, ok := netip.AddrFromSlice(d.To4()); ok && usable4(a) && !slices.Contains(l.dns, a) {
			l.dns = append(l.dns, a)
		}
	}
	if ls := ack.DomainSearch(); ls != nil {
		for _, s := range ls.Labels {
			if s = strings.TrimSuffix(s, "."); validDomain(s) && !slices.Contains(l.search, s) {
				l.search = append(l.search, s)
			}
		}
	}
	if d := strings.TrimSuffix(strings.TrimRight(dhcpv4.GetString(dhcpv4.OptionDomainName, ack.Options), "\x00"), "."); len(l.search) == 0 && validDomain(d) {
		l.search = []string{d}
	}
	if h := ack.HostName(); validDomain(h) && len(h) <= 64 {
		l.hostname = h
	}
	if s, ok := netip.AddrFromSlice(ack.ServerIdentifier().To4()); ok {
		l.server = s
	}
	if lt := ack.IPAddressLeaseTime(0); lt > 0 && lt != time.Duration(0xffffffff)*time.Second {
		l.lease = lt
	}
	return l, nil
}

func usable4(a netip.Addr) bool {
	return a.Is4() && !a.IsUnspecified() && !a.IsMulticast() && !a.IsLoopback() && a != netip.AddrFrom4([4]byte{255, 255, 255, 255})
}

// apply4 configures the lease: the address (with the lease as its
// lifetime: the kernel drops it if nobody renews), then on-link routes,
// then routes through gateways.
func (u *upper) apply4(a *applied, l lease4) (*methodResult, error) {
	if err := a.addAddr(addrNetlink(l.addr, l.lease, l.lease)); err != nil {
		return nil, fmt.Errorf("DHCPv4: %w", err)
	}
	routes := slices.Clone(l.routes)
	slices.SortStableFunc(routes, func(x, y route4) int {
		if x.gw.IsValid() == y.gw.IsValid() {
			return 0
		}
		if !x.gw.IsValid() {
			return -1
		}
		return 1
	})
	res := &methodResult{method: ipconf.DHCP, addrs: []netip.Prefix{l.addr}, dns: l.dns, search: l.search, hostname: l.hostname}
	var desc []string
	for _, r := range routes {
		if err := a.addRoute(route4Netlink(a.index, l.addr, r)); err != nil {
			return nil, fmt.Errorf("DHCPv4: %w", err)
		}
		if r.dst.Bits() == 0 && !res.gateway.IsValid() {
			res.gateway = r.gw
		}
		desc = append(desc, r.String())
	}
	res.detail = "dhcp " + l.addr.String()
	if len(l.routes) == 1 && l.routes[0].dst.Bits() == 0 && l.routes[0].gw.IsValid() {
		res.detail += " gw " + l.routes[0].gw.String()
	} else if len(desc) > 0 {
		res.detail += " routes " + strings.Join(desc, ", ")
	}
	if l.server.IsValid() {
		res.detail += " from " + l.server.String()
	}
	if l.lease > 0 {
		res.detail += " lease " + l.lease.String()
	}
	return res, nil
}

func route4Netlink(index int, local netip.Prefix, r route4) *netlink.Route {
	rt := &netlink.Route{
		LinkIndex: index,
		Dst:       &net.IPNet{IP: r.dst.Addr().AsSlice(), Mask: net.CIDRMask(r.dst.Bits(), 32)},
		Protocol:  unix.RTPROT_DHCP,
		Scope:     netlink.SCOPE_UNIVERSE,
	}
	if !r.gw.IsValid() {
		rt.Scope = netlink.SCOPE_LINK
		return rt
	}
	rt.Gw = r.gw.AsSlice()
	if !local.Contains(r.gw) {
		// A gateway outside the subnet (/32 leases, some clouds) is
		// still on this link.
		rt.Flags = int(netlink.FLAG_ONLINK)
	}
	return rt
}
