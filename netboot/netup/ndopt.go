package netup

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/insomniacslk/dhcp/rfc1035label"
	"golang.org/x/sys/unix"
)

// ndOpts collects the DNS options of IPv6 router advertisements (RDNSS,
// DNSSL: RFC 8106). The kernel does SLAAC itself but passes these options
// on to whoever listens on the RTNLGRP_ND_USEROPT netlink group.
//
// The socket is read synchronously, when auto6 asks, not by a goroutine:
// the kernel adds the SLAAC address before it queues the options of the
// same advertisement, so a background reader could still be asleep when
// auto6 sees the address and asks for the DNS servers (a CI run lost them
// that way). Reading the queue in get leaves no such window.
type ndOpts struct {
	mu     sync.Mutex
	fd     int
	buf    []byte
	dns    map[int][]netip.Addr
	search map[int][]string
}

const rtmNewNDUserOpt = 68 // RTM_NEWNDUSEROPT

// ndSettle bounds the wait, after auto6 saw its address, for the options
// of the advertisement that gave it (queued microseconds after the
// address). An advertisement without DNS options costs this once.
const ndSettle = 20 * time.Millisecond

func listenNDUserOpts() (*ndOpts, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: 1 << (unix.RTNLGRP_ND_USEROPT - 1)}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netlink bind: %w", err)
	}
	return &ndOpts{fd: fd, buf: make([]byte, 65536),
		dns: map[int][]netip.Addr{}, search: map[int][]string{}}, nil
}

// drain reads every queued message without blocking. An overrun queue
// (ENOBUFS) lost some messages but the socket goes on; routers repeat
// their advertisements. Called with n.mu held.
func (n *ndOpts) drain() {
	for {
		k, _, err := unix.Recvfrom(n.fd, n.buf, unix.MSG_DONTWAIT)
		if errors.Is(err, unix.ENOBUFS) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || k <= 0 {
			return
		}
		msgs, err := syscall.ParseNetlinkMessage(n.buf[:k])
		if err != nil {
			continue
		}
		for _, m := range msgs {
			if m.Header.Type != rtmNewNDUserOpt {
				continue
			}
			idx, dns, search, err := parseNDUserOpt(m.Data)
			if err != nil {
				continue
			}
			n.add(idx, dns, search)
		}
	}
}

func (n *ndOpts) add(idx int, dns []netip.Addr, search []string) {
	for _, d := range dns {
		if !slices.Contains(n.dns[idx], d) {
			n.dns[idx] = append(n.dns[idx], d)
		}
	}
	for _, s := range search {
		if !slices.Contains(n.search[idx], s) {
			n.search[idx] = append(n.search[idx], s)
		}
	}
}

// get returns what router advertisements on link idx announced so far.
// When nothing did yet, it waits up to ndSettle for options to arrive.
func (n *ndOpts) get(idx int) ([]netip.Addr, []string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.drain()
	deadline := time.Now().Add(ndSettle)
	for len(n.dns[idx]) == 0 && len(n.search[idx]) == 0 {
		left := time.Until(deadline)
		if left <= 0 {
			break
		}
		fds := []unix.PollFd{{Fd: int32(n.fd), Events: unix.POLLIN}}
		if k, err := unix.Poll(fds, int(left.Milliseconds())+1); err != nil && !errors.Is(err, unix.EINTR) || k == 0 {
			break
		}
		n.drain()
	}
	return slices.Clone(n.dns[idx]), slices.Clone(n.search[idx])
}

func (n *ndOpts) close() {
	n.mu.Lock()
	defer n.mu.Unlock()
	unix.Close(n.fd)
}

// ND option types (RFC 8106).
const (
	ndOptRDNSS = 25
	ndOptDNSSL = 31
)

// parseNDUserOpt parses the payload of an RTM_NEWNDUSEROPT message:
// struct nduseroptmsg (16 bytes) then the ND options of a router
// advertisement. Options with a zero lifetime withdraw servers, so they
// are skipped.
func parseNDUserOpt(b []byte) (ifindex int, dns []netip.Addr, search []string, err error) {
	if len(b) < 16 {
		return 0, nil, nil, errors.New("short nduseroptmsg")
	}
	if b[0] != unix.AF_INET6 {
		return 0, nil, nil, errors.New("not IPv6")
	}
	optLen := int(binary.NativeEndian.Uint16(b[2:4]))
	ifindex = int(int32(binary.NativeEndian.Uint32(b[4:8])))
	if b[8] != 134 { // ICMPv6 router advertisement
		return 0, nil, nil, errors.New("not from a router advertisement")
	}
	opts := b[16:]
	if optLen > len(opts) {
		return 0, nil, nil, errors.New("truncated options")
	}
	opts = opts[:optLen]
	for len(opts) >= 2 {
		typ, l := opts[0], int(opts[1])*8
		if l == 0 || l > len(opts) {
			return ifindex, dns, search, errors.New("bad option length")
		}
		o := opts[:l]
		opts = opts[l:]
		if l < 8 || binary.BigEndian.Uint32(o[4:8]) == 0 {
			continue
		}
		switch typ {
		case ndOptRDNSS:
			for p := o[8:]; len(p) >= 16; p = p[16:] {
				a := netip.AddrFrom16([16]byte(p[:16]))
				if !a.IsUnspecified() && !a.IsMulticast() && !a.Is4In6() && !slices.Contains(dns, a) {
					dns = append(dns, a)
				}
			}
		case ndOptDNSSL:
			// Names in DNS wire format; the zero padding reads as empty
			// names, which validDomain drops.
			ls, err := rfc1035label.FromBytes(o[8:])
			if err != nil {
				continue
			}
			for _, s := range ls.Labels {
				if s = strings.TrimSuffix(s, "."); validDomain(s) && !slices.Contains(search, s) {
					search = append(search, s)
				}
			}
		}
	}
	return ifindex, dns, search, nil
}
