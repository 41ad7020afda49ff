package netup

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/retry"

	"github.com/insomniacslk/dhcp/dhcpv6"
	"github.com/insomniacslk/dhcp/dhcpv6/nclient6"
	"github.com/insomniacslk/dhcp/iana"
	"github.com/unlockrd/unlockrd/netboot/ipconf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// slaac waits for the kernel to configure an address from a router
// advertisement (the kernel does SLAAC itself once the link is up; we
// only wait, with a deadline). Any address that is neither link-local nor
// tentative will do, whatever its scope: QEMU's user network advertises
// the site-local fec0::/64, which the kernel gives RT_SCOPE_SITE, and a
// key server on that network is reachable through it. The console line
// says the scope. DNS servers come from the advertisement's RDNSS/DNSSL
// options.
func (u *upper) slaac(ctx context.Context, a *applied, spec ipconf.Link) (*methodResult, error) {
	start := time.Now()
	u.solicitRouter(a)
	var got []netip.Prefix
	for {
		addrs, err := netlink.AddrList(a.link, netlink.FAMILY_V6)
		if err != nil {
			return nil, fmt.Errorf("auto6: list addresses: %w", err)
		}
		for _, x := range addrs {
			ip, _ := netip.AddrFromSlice(x.IP)
			if x.Scope == unix.RT_SCOPE_LINK || x.Scope == unix.RT_SCOPE_HOST || ip.IsLinkLocalUnicast() ||
				!usable6(x.Flags) || x.Flags&unix.IFA_F_DEPRECATED != 0 || a.ours(x.IP) {
				continue
			}
			ones, _ := x.Mask.Size()
			got = append(got, netip.PrefixFrom(ip, ones))
		}
		if len(got) > 0 {
			break
		}
		if err := retry.Sleep(ctx, 20*time.Millisecond); err != nil {
			return nil, fmt.Errorf("auto6: no address beyond link-local from a router advertisement after %.1fs: %w", time.Since(start).Seconds(), err)
		}
	}
	res := &methodResult{method: ipconf.Auto6, addrs: got}
	res.gateway = gateway6(a)
	if u.nd != nil {
		res.dns, res.search = u.nd.get(a.index)
	}
	res.detail = "auto6 " + scoped(got)
	if res.gateway.IsValid() {
		res.detail += " gw " + res.gateway.String()
	}
	return res, nil
}

// dhcp6 obtains addresses by DHCPv6 (rapid commit when the server allows
// it, else solicit/advertise/request), retransmitting like dhcp4. DHCPv6 carries no routes: the
// default route comes from router advertisements, which the kernel
// handles; we wait a little for it so that the key server is reachable.
func (u *upper) dhcp6(ctx context.Context, a *applied, spec ipconf.Link) (*methodResult, error) {
	start := time.Now()
	u.solicitRouter(a)
	ll, err := waitLinkLocal(ctx, a)
	if err != nil {
		return nil, fmt.Errorf("DHCPv6: %w", err)
	}
	conn, err := net.ListenUDP("udp6", &net.UDPAddr{IP: ll.AsSlice(), Port: dhcpv6.DefaultClientPort, Zone: a.name})
	if err != nil {
		return nil, fmt.Errorf("DHCPv6: %w", err)
	}
	mac := a.link.Attrs().HardwareAddr
	if l, err := netlink.LinkByIndex(a.index); err == nil {
		mac = l.Attrs().HardwareAddr
	}
	c, err := nclient6.NewWithConn(conn, mac, nclient6.WithTimeout(time.Second), nclient6.WithRetry(-1))
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("DHCPv6 client: %w", err)
	}
	defer c.Close()
	// A DUID without a time stamp: the same host asks with the same
	// identity on every boot.
	mods := []dhcpv6.Modifier{dhcpv6.WithClientID(&dhcpv6.DUIDLL{HWType: iana.HWTypeEthernet, LinkLayerAddr: mac})}
	if spec.Hostname != "" {
		mods = append(mods, dhcpv6.WithFQDN(0, spec.Hostname))
	}
	var reply *dhcpv6.Message
	for attempt := 1; ; attempt++ {
		reply, err = c.RapidSolicit(ctx, mods...)
		if err == nil {
			if err = checkReply6(reply); err == nil {
				break
			}
		}
		last := err.Error()
		if ctx.Err() != nil {
			last = "no answer"
		}
		fail := func(err error) error {
			return fmt.Errorf("DHCPv6: no lease after %.1fs (%s): %w", time.Since(start).Seconds(), last, err)
		}
		if ctx.Err() != nil {
			return nil, fail(ctx.Err())
		}
		u.debugf("%s: DHCPv6: %s; starting over", a.name, last)
		if err := retry.Sleep(ctx, retry.Backoff{Base: 500 * time.Millisecond, Cap: 4 * time.Second}.Delay(attempt-1)); err != nil {
			return nil, fail(err)
		}
	}
	res := &methodResult{method: ipconf.DHCP6}
	for _, ia := range reply.Options.OneIANA().Options.Addresses() {
		ip, ok := netip.AddrFromSlice(ia.IPv6Addr)
		if !ok || !ip.Is6() || ip.Is4In6() || ip.IsMulticast() || ip.IsLinkLocalUnicast() || ip.IsUnspecified() {
			continue
		}
		p := netip.PrefixFrom(ip, 128)
		if err := a.addAddr(addrNetlink(p, ia.ValidLifetime, ia.PreferredLifetime)); err != nil {
			return nil, fmt.Errorf("DHCPv6: %w", err)
		}
		res.addrs = append(res.addrs, p)
	}
	if len(res.addrs) == 0 {
		return nil, errors.New("DHCPv6: the reply holds no usable address")
	}
	for _, p := range res.addrs {
		if err := waitDAD(ctx, a, p.Addr()); err != nil {
			return nil, fmt.Errorf("DHCPv6: %w", err)
		}
	}
	for _, d := range reply.Options.DNS() {
		if ip, ok := netip.AddrFromSlice(d); ok && ip.Is6() && !ip.IsUnspecified() && !ip.IsMulticast() && !slices.Contains(res.dns, ip) {
			res.dns = append(res.dns, ip)
		}
	}
	if ls := reply.Options.DomainSearchList(); ls != nil {
		for _, s := range ls.Labels {
			if s = strings.TrimSuffix(s, "."); validDomain(s) && !slices.Contains(res.search, s) {
				res.search = append(res.search, s)
			}
		}
	}
	if u.nd != nil {
		dns, search := u.nd.get(a.index)
		for _, d := range dns {
			if !slices.Contains(res.dns, d) {
				res.dns = append(res.dns, d)
			}
		}
		for _, s := range search {
			if !slices.Contains(res.search, s) {
				res.search = append(res.search, s)
			}
		}
	}
	// The router advertisement that told us to use DHCPv6 usually came
	// with a default route already; give a late one a moment.
	wait, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	for !res.gateway.IsValid() {
		if res.gateway = gateway6(a); res.gateway.IsValid() || retry.Sleep(wait, 20*time.Millisecond) != nil {
			break
		}
	}
	res.detail = "dhcp6 " + prefixes(res.addrs)
	if res.gateway.IsValid() {
		res.detail += " gw " + res.gateway.String()
	} else {
		res.detail += " (no router advertisement: on-link only)"
	}
	if sid := reply.Options.ServerID(); sid != nil {
		res.detail += " from server " + sid.String()
	}
	return res, nil
}

// solicitRouter sends one router solicitation at once. The kernel sends
// its own only once the link-local address has passed duplicate address
// detection, a second or more after the link comes up; routers answer
// any solicitation, and the kernel processes the advertisement whoever
// asked. It is sent from the unspecified address, so that the router
// answers to all nodes: a unicast answer to our optimistic link-local
// address would wait for neighbour discovery, which an optimistic
// address does not answer (RFC 4429). Best effort: the kernel's own
// solicitations follow anyway.
func (u *upper) solicitRouter(a *applied) {
	mac := a.link.Attrs().HardwareAddr
	if l, err := netlink.LinkByIndex(a.index); err == nil {
		mac = l.Attrs().HardwareAddr
	}
	if err := sendRS(a.index, mac); err != nil {
		u.debugf("%s: router solicitation: %v", a.name, err)
	}
}

func sendRS(ifindex int, mac net.HardwareAddr) error {
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	frame := rsFrame(mac)
	to := &unix.SockaddrLinklayer{Ifindex: ifindex, Halen: 6, Protocol: htons(unix.ETH_P_IPV6)}
	copy(to.Addr[:], frame[:6])
	return unix.Sendto(fd, frame, 0, to)
}

// rsFrame is an Ethernet frame holding a router solicitation from :: to
// all routers (ff02::2), hop limit 255, without options.
func rsFrame(src net.HardwareAddr) []byte {
	allRouters := [16]byte{0xff, 0x02, 15: 2}
	f := make([]byte, 14+40+8)
	copy(f[0:6], []byte{0x33, 0x33, 0, 0, 0, 2})
	copy(f[6:12], src)
	binary.BigEndian.PutUint16(f[12:14], unix.ETH_P_IPV6)
	ip := f[14:54]
	ip[0] = 6 << 4
	binary.BigEndian.PutUint16(ip[4:6], 8) // payload length
	ip[6] = unix.IPPROTO_ICMPV6
	ip[7] = 255
	copy(ip[24:40], allRouters[:]) // source stays ::
	icmp := f[54:]
	icmp[0] = 133 // router solicitation
	// Checksum over the pseudo-header (source, destination, length, next
	// header) and the message.
	var sum uint32
	add := func(b []byte) {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(b[i:]))
		}
	}
	add(ip[8:40])
	sum += 8 + unix.IPPROTO_ICMPV6
	add(icmp)
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(icmp[2:4], ^uint16(sum))
	return f
}

// htons puts v in network byte order, as sockaddr_ll wants its protocol.
func htons(v uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return binary.NativeEndian.Uint16(b[:])
}

// checkReply6 refuses replies without an address.
func checkReply6(m *dhcpv6.Message) error {
	if st := m.Options.Status(); st != nil && st.StatusCode != iana.StatusSuccess {
		return fmt.Errorf("server answered %s: %s", st.StatusCode, st.StatusMessage)
	}
	ia := m.Options.OneIANA()
	if ia == nil {
		return errors.New("reply without an address (IA_NA)")
	}
	if st := ia.Options.Status(); st != nil && st.StatusCode != iana.StatusSuccess {
		return fmt.Errorf("server answered %s: %s", st.StatusCode, st.StatusMessage)
	}
	if len(ia.Options.Addresses()) == 0 {
		return errors.New("reply without an address")
	}
	return nil
}

// waitLinkLocal waits for the link's link-local address to pass duplicate
// address detection: DHCPv6 is sent from it.
func waitLinkLocal(ctx context.Context, a *applied) (netip.Addr, error) {
	start := time.Now()
	for {
		addrs, err := netlink.AddrList(a.link, netlink.FAMILY_V6)
		if err != nil {
			return netip.Addr{}, fmt.Errorf("list addresses: %w", err)
		}
		for _, x := range addrs {
			ip, _ := netip.AddrFromSlice(x.IP)
			if ip.IsLinkLocalUnicast() && usable6(x.Flags) {
				return ip, nil
			}
		}
		if err := retry.Sleep(ctx, 20*time.Millisecond); err != nil {
			return netip.Addr{}, fmt.Errorf("no usable link-local address after %.1fs: %w", time.Since(start).Seconds(), err)
		}
	}
}

// gateway6 returns the IPv6 default router on the link, if any.
func gateway6(a *applied) netip.Addr {
	rs, err := netlink.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{LinkIndex: a.index}, netlink.RT_FILTER_OIF)
	if err != nil {
		return netip.Addr{}
	}
	for _, r := range rs {
		if (r.Dst == nil || r.Dst.IP.IsUnspecified() && onesOf(r.Dst) == 0) && r.Gw != nil {
			g, _ := netip.AddrFromSlice(r.Gw)
			return g
		}
	}
	return netip.Addr{}
}

func onesOf(n *net.IPNet) int {
	o, _ := n.Mask.Size()
	return o
}

// scoped is prefixes with each address's scope, "fec0::1/64 (site-local)".
func scoped(ps []netip.Prefix) string {
	var s []string
	for _, p := range ps {
		s = append(s, p.String()+" ("+scope6(p.Addr())+")")
	}
	return strings.Join(s, ", ")
}

// scope6 names the scope of a SLAAC address: fec0::/10 is the deprecated
// site-local scope (RFC 3879) that QEMU's user network still advertises,
// fc00::/7 the unique local addresses (RFC 4193), the rest global.
func scope6(ip netip.Addr) string {
	switch {
	case netip.MustParsePrefix("fec0::/10").Contains(ip):
		return "site-local"
	case netip.MustParsePrefix("fc00::/7").Contains(ip):
		return "unique-local"
	}
	return "global"
}

func prefixes(ps []netip.Prefix) string {
	var s []string
	for _, p := range ps {
		s = append(s, p.String())
	}
	return strings.Join(s, ", ")
}
