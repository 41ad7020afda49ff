package netup

import (
	"context"
	"fmt"
	"net"
	"strings"

	"github.com/unlockrd/unlockrd/netboot/ipconf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// static configures the addresses and gateways of the full ip= form. An
// address the kernel refuses is bad input (Up falls back to DHCP); an
// IPv6 address is ready once duplicate address detection has passed.
func (u *upper) static(ctx context.Context, a *applied, spec ipconf.Link) (*methodResult, error) {
	res := &methodResult{method: ipconf.Static, dns: spec.DNS, hostname: spec.Hostname}
	var desc []string
	for _, s := range spec.Static {
		if err := a.addAddr(addrNetlink(s.Prefix, 0, 0)); err != nil {
			return nil, &badInput{fmt.Sprintf("static: %v", err)}
		}
		res.addrs = append(res.addrs, s.Prefix)
		d := s.Prefix.String()
		if s.Gateway.IsValid() {
			d += " gw " + s.Gateway.String()
		}
		desc = append(desc, d)
	}
	for _, s := range spec.Static {
		if s.Prefix.Addr().Is6() {
			if err := waitDAD(ctx, a, s.Prefix.Addr()); err != nil {
				return nil, fmt.Errorf("static: %w", err)
			}
		}
	}
	for _, s := range spec.Static {
		if !s.Gateway.IsValid() {
			continue
		}
		bits := s.Prefix.Addr().BitLen()
		rt := &netlink.Route{
			LinkIndex: a.index,
			Dst:       &net.IPNet{IP: net.IP(make([]byte, bits/8)), Mask: net.CIDRMask(0, bits)},
			Gw:        s.Gateway.AsSlice(),
			Protocol:  unix.RTPROT_STATIC,
			Scope:     netlink.SCOPE_UNIVERSE,
		}
		if !s.Prefix.Masked().Contains(s.Gateway) && !s.Gateway.IsLinkLocalUnicast() {
			rt.Flags = int(netlink.FLAG_ONLINK)
		}
		if err := a.addRoute(rt); err != nil {
			return nil, &badInput{fmt.Sprintf("static: %v", err)}
		}
		if !res.gateway.IsValid() {
			res.gateway = s.Gateway
		}
	}
	res.detail = "static " + strings.Join(desc, ", ")
	return res, nil
}
