package netup

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/unlockrd/unlockrd/netboot/ipconf"
	"github.com/vishvananda/netlink"
)

// outcome is what one link's worker reports.
type outcome struct {
	link string
	res  *Result // the winner only
	err  error
}

// round races every link the plan selects: links are picked up as their
// drivers register them, the first one configured wins and the others
// are cancelled and set down. It returns when every worker has finished.
func (u *upper) round(ctx context.Context, plan ipconf.Plan) (*Result, error) {
	u.mu.Lock()
	u.winner = ""
	u.mu.Unlock()
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()

	outcomes := make(chan outcome)
	running := 0
	seen := map[int]bool{}
	var names []string // every Ethernet link seen, for messages
	matched := make([]bool, len(plan.Links))
	var winner *Result
	var failures []string
	// bad is input that cannot work (stops the round); badFail the first
	// link that failed for such a reason.
	var bad, badFail error

	// Link notifications make a new link start at once; the ticker is
	// the safety net for a lost notification.
	updates := make(chan netlink.LinkUpdate, 32)
	done := make(chan struct{})
	defer close(done)
	if err := netlink.LinkSubscribe(updates, done); err != nil {
		u.debugf("link notifications unavailable (%v): polling", err)
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	appear := time.NewTimer(u.cfg.LinkTimeout)
	defer appear.Stop()
	drivers := u.cfg.DriversLoaded
	var settle <-chan time.Time
	expectMore := true
	named := !slices.ContainsFunc(plan.Links, func(l ipconf.Link) bool { return l.Select.All() })

	scan := func() {
		if winner != nil || bad != nil {
			return
		}
		links, err := netlink.LinkList()
		if err != nil {
			u.debugf("list links: %v", err)
			return
		}
		for _, l := range links {
			a := l.Attrs()
			if seen[a.Index] || !isEthernet(l) {
				continue
			}
			seen[a.Index] = true
			names = append(names, a.Name)
			idx := -1
			for i, pl := range plan.Links {
				if !pl.Select.Matches(a.Name, a.HardwareAddr) {
					continue
				}
				if idx >= 0 {
					bad = &badInput{fmt.Sprintf("ip=%s and ip=%s both select %s (%s)",
						plan.Links[idx].Values[0], pl.Values[0], a.Name, a.HardwareAddr)}
					cancel()
					return
				}
				idx = i
			}
			if idx < 0 {
				u.log.Printf("%s: not selected by ip=%s; left down", a.Name, strings.Join(planValues(plan), " ip="))
				continue
			}
			matched[idx] = true
			spec := plan.Links[idx]
			if spec.Off {
				u.log.Printf("%s: left down (ip=%s)", a.Name, spec.Values[0])
				continue
			}
			running++
			go func() { outcomes <- u.runLink(rctx, l, spec) }()
		}
		if named && !slices.Contains(matched, false) {
			// Every link the plan names is there: nothing else matters.
			expectMore = false
		}
	}
	ctxDone := ctx.Done()
	scan()
	for {
		finished := running == 0 && (winner != nil || bad != nil || !expectMore || ctx.Err() != nil)
		if finished {
			break
		}
		select {
		case _, ok := <-updates:
			if !ok {
				updates = nil
			}
			scan()
		case <-tick.C:
			scan()
		case <-appear.C:
			scan()
			expectMore = false
		case <-drivers:
			drivers = nil
			settle = time.After(DriversGrace)
		case <-settle:
			scan()
			expectMore = false
		case o := <-outcomes:
			running--
			switch {
			case o.res != nil:
				winner = o.res
				cancel()
			case o.err != nil:
				failures = append(failures, o.link+": "+o.err.Error())
				var bi *badInput
				if errors.As(o.err, &bi) && badFail == nil {
					badFail = &badInput{o.link + ": " + bi.msg}
				}
			}
		case <-ctxDone:
			ctxDone = nil
			cancel()
			expectMore = false
		}
	}
	if winner != nil {
		return winner, nil
	}
	if bad != nil {
		return nil, bad
	}
	var missing []string
	for i, ok := range matched {
		if !ok && !plan.Links[i].Select.All() {
			missing = append(missing, fmt.Sprintf("ip=%s: no link %s", plan.Links[i].Values[0], plan.Links[i].Select))
		}
	}
	if len(missing) > 0 && ctx.Err() == nil {
		msg := fmt.Sprintf("%s (Ethernet links: %s)", strings.Join(missing, "; "), listOrNone(names))
		if len(failures) > 0 {
			msg += "; " + strings.Join(failures, "; ")
		}
		return nil, &badInput{msg}
	}
	if badFail != nil && ctx.Err() == nil {
		return nil, badFail
	}
	if len(names) == 0 {
		all, _ := netlink.LinkList()
		var ls []string
		for _, l := range all {
			ls = append(ls, l.Attrs().Name)
		}
		err := fmt.Errorf("no Ethernet link appeared (links: %s)", listOrNone(ls))
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%w: %w", err, ctx.Err())
		}
		return nil, err
	}
	err := fmt.Errorf("no link configured (%s)", strings.Join(append(failures, missing...), "; "))
	if ctx.Err() != nil {
		return nil, fmt.Errorf("%w: %w", err, ctx.Err())
	}
	return nil, err
}

func planValues(p ipconf.Plan) []string {
	var vs []string
	for _, l := range p.Links {
		vs = append(vs, l.Values...)
	}
	return vs
}

func listOrNone(s []string) string {
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, ", ")
}

// runLink configures one link and prints its one line. It keeps the
// configuration only if the link is the first one configured.
func (u *upper) runLink(ctx context.Context, l netlink.Link, spec ipconf.Link) outcome {
	a := newApplied(l)
	why := "default: DHCP on every Ethernet link"
	if len(spec.Values) > 0 && !(len(spec.Values) == 1 && spec.Values[0] == "dhcp" && spec.Select.All()) {
		why = "ip=" + strings.Join(spec.Values, " ip=")
	}
	res, err := u.configure(ctx, a, spec)
	if err == nil && u.claim(a.name) {
		res.applied = a
		u.log.Printf("%s: %s; configured first, keeping it (%s) (link up to configured %.2fs)", a.name, res.detail, why, res.Took.Seconds())
		return outcome{link: a.name, res: &res.Result}
	}
	undoErr := a.undo()
	suffix := "set down"
	if undoErr != nil {
		suffix = fmt.Sprintf("set down incompletely: %v", undoErr)
	}
	w := u.winnerName()
	switch {
	case err == nil:
		u.log.Printf("%s: %s, but %s was configured first; %s", a.name, res.detail, w, suffix)
		return outcome{link: a.name}
	case w != "":
		u.log.Printf("%s: %s was configured first (this link: %s); %s", a.name, w, trimCtx(err), suffix)
		return outcome{link: a.name}
	}
	u.log.Printf("%s: %s (%s); %s", a.name, trimCtx(err), why, suffix)
	return outcome{link: a.name, err: errors.New(trimCtx(err))}
}

// trimCtx drops the context's own words from an error that a deadline or
// a cancellation ended: the message before them says what happened.
func trimCtx(err error) string {
	s := err.Error()
	for _, e := range []error{context.Canceled, context.DeadlineExceeded} {
		s = strings.TrimSuffix(s, ": "+e.Error())
	}
	return s
}

// linkResult is a configured link before it is claimed.
type linkResult struct {
	Result
	detail string // what it got, for its console line
}

// methodResult is what one method configured.
type methodResult struct {
	method   ipconf.Method
	addrs    []netip.Prefix
	gateway  netip.Addr
	dns      []netip.Addr
	search   []string
	hostname string
	detail   string
}

// configure sets the link up, waits for carrier and runs the link's
// methods side by side. The link counts as configured when every method
// has finished and at least one succeeded.
func (u *upper) configure(ctx context.Context, a *applied, spec ipconf.Link) (*linkResult, error) {
	if spec.MAC != nil {
		if err := a.setMAC(spec.MAC); err != nil {
			return nil, &badInput{err.Error()}
		}
	}
	if spec.MTU != 0 {
		if err := a.setMTU(spec.MTU); err != nil {
			return nil, &badInput{err.Error()}
		}
	}
	if spec.Methods&(ipconf.DHCP6|ipconf.Auto6) != 0 || slices.ContainsFunc(spec.Static, func(s ipconf.Address) bool { return s.Prefix.Addr().Is6() }) {
		if err := a.enableIPv6(spec.Methods&ipconf.Auto6 != 0); err != nil {
			return nil, err
		}
	}
	if err := a.up(); err != nil {
		return nil, err
	}
	upAt := time.Now()
	if err := waitCarrier(ctx, a, u.cfg.CarrierTimeout); err != nil {
		return nil, err
	}
	u.debugf("%s: carrier after %.2fs", a.name, time.Since(upAt).Seconds())

	type run struct {
		m   ipconf.Method
		res *methodResult
		err error
	}
	var runs []*run
	var wg sync.WaitGroup
	for _, m := range []ipconf.Method{ipconf.Static, ipconf.DHCP, ipconf.DHCP6, ipconf.Auto6} {
		if spec.Methods&m == 0 {
			continue
		}
		r := &run{m: m}
		runs = append(runs, r)
		wg.Go(func() {
			mctx, cancel := context.WithTimeout(ctx, u.cfg.MethodTimeout)
			defer cancel()
			switch m {
			case ipconf.Static:
				r.res, r.err = u.static(mctx, a, spec)
			case ipconf.DHCP:
				r.res, r.err = u.dhcp4(mctx, a, spec)
			case ipconf.DHCP6:
				r.res, r.err = u.dhcp6(mctx, a, spec)
			case ipconf.Auto6:
				r.res, r.err = u.slaac(mctx, a, spec)
			}
		})
	}
	wg.Wait()
	out := &linkResult{Result: Result{Link: a.name, Took: time.Since(upAt)}}
	var errs []error
	var details []string
	var ms ipconf.Method
	for _, r := range runs {
		if r.err != nil {
			errs = append(errs, r.err)
			continue
		}
		ms |= r.m
		m := r.res
		out.Addrs = append(out.Addrs, m.addrs...)
		if !out.Gateway.IsValid() {
			out.Gateway = m.gateway
		}
		for _, d := range m.dns {
			if !slices.Contains(out.DNS, d) {
				out.DNS = append(out.DNS, d)
			}
		}
		for _, s := range m.search {
			if !slices.Contains(out.Search, s) {
				out.Search = append(out.Search, s)
			}
		}
		if out.Hostname == "" {
			out.Hostname = m.hostname
		}
		details = append(details, m.detail)
	}
	if ms == 0 {
		return nil, errors.Join(errs...)
	}
	for _, e := range errs {
		details = append(details, "but "+e.Error())
	}
	if spec.Hostname != "" {
		out.Hostname = spec.Hostname
	}
	// ip= DNS servers come before the ones the network announced.
	out.DNS = append(slices.Clone(spec.DNS), slices.DeleteFunc(out.DNS, func(d netip.Addr) bool { return slices.Contains(spec.DNS, d) })...)
	out.Method = ms.String()
	if len(out.Addrs) > 0 {
		out.Addr = out.Addrs[0]
	}
	out.detail = strings.Join(details, "; ")
	if len(out.DNS) > 0 {
		out.detail += ", dns " + joinAddrs(out.DNS)
	}
	if len(out.Search) > 0 {
		out.detail += ", search " + strings.Join(out.Search, " ")
	}
	if out.Hostname != "" {
		out.detail += ", host name " + out.Hostname
	}
	return out, nil
}

func joinAddrs(as []netip.Addr) string {
	var s []string
	for _, a := range as {
		s = append(s, a.String())
	}
	return strings.Join(s, " ")
}
