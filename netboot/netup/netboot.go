// Package netboot is boot stage 4: it brings up the network the key fetch
// needs, and (stage 8) takes down what it configured so the real OS starts
// from a clean state.
//
// The ip= values (package ipconf) name the links and methods; by default
// every Ethernet link is brought up and raced with DHCPv4, the first link
// to be configured wins and the others are set down again. Every wait has
// a deadline; a round in which no link gets configured is retried with
// backoff, and input that cannot work (a link that does not exist, values
// that contradict each other) is reported and replaced by DHCP on every
// link rather than left to hang.
package netup

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/retry"

	"github.com/unlockrd/unlockrd/initramfs/ulog"

	"github.com/unlockrd/unlockrd/netboot/ipconf"
	"golang.org/x/sys/unix"
)

// Config is what stage 4 needs from the configuration.
type Config struct {
	// Plan is the parsed ip= values (package ipconf); the zero Plan
	// means "dhcp" (ipconf.Default).
	Plan ipconf.Plan
	// Nameservers from nameserver= come first in resolv.conf.
	Nameservers []netip.Addr
	// LinkTimeout bounds the wait for the links the plan names to appear
	// (drivers register links asynchronously); default 30s.
	LinkTimeout time.Duration
	// DriversLoaded, when non-nil, is closed once every network driver
	// is loaded: links missing DriversGrace later will not appear, so a
	// misspelt link name falls back to DHCP without waiting LinkTimeout.
	DriversLoaded <-chan struct{}
	// CarrierTimeout bounds the wait for carrier on each link; default 10s.
	CarrierTimeout time.Duration
	// MethodTimeout bounds DHCPv4, DHCPv6 and the wait for a router
	// advertisement on each link in one round; default 30s.
	MethodTimeout time.Duration
	// ResolvConf is the file DNS settings are written to; default
	// /etc/resolv.conf, which Go's resolver (the key fetch) reads.
	ResolvConf string
	// Debug logs every retry, not only one line per link.
	Debug bool
}

// DriversGrace is how long after DriversLoaded a missing link is given to
// appear: some drivers register their link from a work queue after probe.
const DriversGrace = 2 * time.Second

func (c *Config) defaults() {
	if c.LinkTimeout <= 0 {
		c.LinkTimeout = 30 * time.Second
	}
	if c.CarrierTimeout <= 0 {
		c.CarrierTimeout = 10 * time.Second
	}
	if c.MethodTimeout <= 0 {
		c.MethodTimeout = 30 * time.Second
	}
	if c.ResolvConf == "" {
		c.ResolvConf = "/etc/resolv.conf"
	}
}

// Result is the configured network: the link that won, what it got, and
// what Teardown has to undo.
type Result struct {
	// Link is the configured link; empty for ip=none.
	Link string
	// Method is what configured it, e.g. "dhcp", "static", "dhcp+auto6".
	Method string
	// Addr is the first address; Addrs all of them.
	Addr     netip.Prefix
	Addrs    []netip.Prefix
	Gateway  netip.Addr
	DNS      []netip.Addr
	Search   []string
	Hostname string
	// Took is the time from setting the link up to its configuration.
	Took time.Duration

	applied     *applied
	oldHostname *string
	resolv      *fileBackup
}

// String is the stage line: "eth0 10.0.2.15/24 via dhcp".
func (r *Result) String() string {
	if r.Link == "" {
		return "no link configured (ip=none)"
	}
	var as []string
	for _, a := range r.Addrs {
		as = append(as, a.String())
	}
	return fmt.Sprintf("%s %s via %s", r.Link, strings.Join(as, ", "), r.Method)
}

// Up configures the network according to cfg. It returns once one link is
// configured, or with an error when ctx ends first.
func Up(ctx context.Context, cfg Config, log ulog.Logger) (*Result, error) {
	cfg.defaults()
	u := &upper{cfg: cfg, log: log}
	plan := cfg.Plan
	if !plan.None && len(plan.Links) == 0 {
		plan = ipconf.Default()
	}
	ns := cfg.Nameservers
	if plan.None || !slices.ContainsFunc(plan.Links, func(l ipconf.Link) bool { return !l.Off }) {
		vs := planValues(plan)
		if len(vs) == 0 {
			vs = plan.Format() // ip=none keeps no link, so no values
		}
		log.Printf("ip=%s: no link configured", strings.Join(vs, " ip="))
		return &Result{Method: "none"}, nil
	}
	if err := loUp(); err != nil {
		return nil, err
	}
	// Router advertisements carry IPv6 DNS servers; the kernel hands them
	// over only to listeners present when the advertisement arrives.
	if nd, err := listenNDUserOpts(); err != nil {
		u.debugf("IPv6 DNS from router advertisements unavailable: %v", err)
	} else {
		u.nd = nd
		defer nd.close()
	}
	var last error // the last round that ran to its end
	for round := 1; ; round++ {
		res, err := u.round(ctx, plan)
		if err == nil {
			if err := u.finish(res, ns); err != nil {
				_ = res.Teardown()
				return nil, err
			}
			return res, nil
		}
		var bi *badInput
		if errors.As(err, &bi) && !isDefault(plan) {
			log.Printf("%v; falling back to DHCP on every link", err)
			plan = ipconf.Default()
			continue
		}
		if ctx.Err() != nil {
			if last == nil {
				last = err
			}
			return nil, fmt.Errorf("no link configured before the deadline (%s): %w", trimCtx(last), ctx.Err())
		}
		last = err
		wait := retry.Backoff{Base: time.Second, Cap: 30 * time.Second}.Delay(round - 1)
		if dl, ok := ctx.Deadline(); ok && time.Until(dl) < wait {
			wait = max(time.Until(dl), 0)
		}
		log.Printf("%v; retrying every link in %.1fs", err, wait.Seconds())
		if err := retry.Sleep(ctx, wait); err != nil {
			return nil, fmt.Errorf("no link configured before the deadline (%s): %w", trimCtx(last), err)
		}
	}
}

func isDefault(p ipconf.Plan) bool {
	return len(p.Links) == 1 && p.Links[0].Select.All() && p.Links[0].Methods == ipconf.DHCP &&
		len(p.Links[0].Static) == 0 && p.Links[0].Hostname == "" && len(p.Links[0].DNS) == 0 &&
		p.Links[0].MTU == 0 && p.Links[0].MAC == nil
}

// badInput is a configuration that cannot work on this machine; Up falls
// back to DHCP on every link.
type badInput struct{ msg string }

func (e *badInput) Error() string { return e.msg }

// upper is one Up call.
type upper struct {
	cfg Config
	log ulog.Logger
	nd  *ndOpts

	mu     sync.Mutex
	winner string
}

func (u *upper) debugf(format string, v ...any) {
	if u.cfg.Debug {
		u.log.Printf("debug: "+format, v...)
	}
}

// claim makes link the winner of the round unless another link won.
func (u *upper) claim(link string) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.winner != "" {
		return false
	}
	u.winner = link
	return true
}

func (u *upper) winnerName() string {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.winner
}

// finish writes resolv.conf and the host name for the winning link.
func (u *upper) finish(res *Result, cmdlineNS []netip.Addr) error {
	var dns []netip.Addr
	for _, a := range append(slices.Clone(cmdlineNS), res.DNS...) {
		if !slices.Contains(dns, a) {
			dns = append(dns, a)
		}
	}
	res.DNS = dns
	if len(dns) > 0 || len(res.Search) > 0 {
		b, err := backupFile(u.cfg.ResolvConf)
		if err != nil {
			return err
		}
		if err := writeResolvConf(u.cfg.ResolvConf, dns, res.Search); err != nil {
			return err
		}
		res.resolv = b
	}
	if res.Hostname != "" {
		old, err := os.Hostname()
		if err == nil && old != res.Hostname {
			if err := unix.Sethostname([]byte(res.Hostname)); err != nil {
				u.log.Printf("%s: set host name %s: %v", res.Link, res.Hostname, err)
			} else {
				res.oldHostname = &old
			}
		}
	}
	return nil
}

// Teardown removes the routes and addresses Up added, sets the link down
// and puts back the host name and resolv.conf, so the real OS configures
// its network from a clean state.
func (r *Result) Teardown() error {
	if r == nil {
		return nil
	}
	var errs []error
	if r.applied != nil {
		errs = append(errs, r.applied.undo())
	}
	if r.oldHostname != nil {
		if err := unix.Sethostname([]byte(*r.oldHostname)); err != nil {
			errs = append(errs, fmt.Errorf("restore host name %q: %w", *r.oldHostname, err))
		}
		r.oldHostname = nil
	}
	if r.resolv != nil {
		errs = append(errs, r.resolv.restore())
		r.resolv = nil
	}
	r.applied = nil
	return errors.Join(errs...)
}
