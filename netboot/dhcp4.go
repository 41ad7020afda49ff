package netboot

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/dhcpv4/nclient4"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// dhcp4 obtains a lease on link and configures it. It retries until ctx
// ends, with a short per-exchange timeout so a lost packet costs little.
func dhcp4(ctx context.Context, link netlink.Link, log Logger) (*Result, error) {
	name := link.Attrs().Name
	c, err := nclient4.New(name, nclient4.WithTimeout(2*time.Second), nclient4.WithRetry(2))
	if err != nil {
		return nil, fmt.Errorf("%s: DHCP client: %w", name, err)
	}
	defer c.Close()
	var lease *nclient4.Lease
	for attempt := 1; ; attempt++ {
		lease, err = c.Request(ctx)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%s: no DHCP lease: %w", name, errors.Join(err, ctx.Err()))
		}
		wait := time.Duration(attempt) * 500 * time.Millisecond
		if wait > 4*time.Second {
			wait = 4 * time.Second
		}
		log.Printf("%s: DHCP attempt %d failed: %v; retrying in %s", name, attempt, err, wait)
		if err := sleep(ctx, wait); err != nil {
			return nil, fmt.Errorf("%s: no DHCP lease: %w", name, err)
		}
	}
	ack := lease.ACK
	mask := ack.SubnetMask()
	if mask == nil {
		mask = ack.YourIPAddr.DefaultMask()
	}
	ipn := &net.IPNet{IP: ack.YourIPAddr.To4(), Mask: mask}
	addr := &netlink.Addr{IPNet: ipn}
	if lt := ack.IPAddressLeaseTime(0); lt > 0 {
		// The kernel expires the address if we never renew; the real OS
		// takes over long before.
		addr.ValidLft = int(lt.Seconds())
		addr.PreferedLft = int(lt.Seconds())
	}
	if err := netlink.AddrReplace(link, addr); err != nil {
		return nil, fmt.Errorf("%s: add address %s: %w", name, ipn, err)
	}
	res := &Result{Link: name, Method: "dhcp", link: link, addrs: []*netlink.Addr{addr}}
	ones, _ := mask.Size()
	a, _ := netip.AddrFromSlice(ipn.IP)
	res.Addr = netip.PrefixFrom(a, ones)
	if routers := dhcpv4.GetIPs(dhcpv4.OptionRouter, ack.Options); len(routers) > 0 {
		gw := routers[0].To4()
		rt := &netlink.Route{LinkIndex: link.Attrs().Index, Gw: gw, Scope: netlink.SCOPE_UNIVERSE, Protocol: unix.RTPROT_DHCP}
		if err := netlink.RouteReplace(rt); err != nil {
			return nil, fmt.Errorf("%s: default route via %s: %w", name, gw, err)
		}
		res.routes = append(res.routes, rt)
		res.Gateway, _ = netip.AddrFromSlice(gw)
	}
	for _, d := range ack.DNS() {
		if a, ok := netip.AddrFromSlice(d.To4()); ok {
			res.DNS = append(res.DNS, a)
		}
	}
	return res, nil
}
