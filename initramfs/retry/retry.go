// Package retry is the one backoff policy of unlockrd: every wait between
// attempts (DHCP, router solicitations, key fetches, refetching a key that
// opened nothing) is capped exponential backoff with jitter, slept through a
// context so that a stage's deadline ends it. Shared by boot and host code.
package retry

import (
	"context"
	"math/rand/v2"
	"time"
)

// Backoff is capped exponential backoff with jitter. Before retry n (0 for
// the first) the step is min(Cap, Base·2ⁿ); the wait is uniform in
// (0, step] with Full jitter, in [step/2, step] without. Jitter keeps hosts
// that failed together (a fleet rebooting after a power event) from
// retrying in lockstep; full jitter spreads them over the whole window.
type Backoff struct {
	Base time.Duration
	Cap  time.Duration
	Full bool
}

// Delay is the jittered wait before retry n (n ≥ 0).
func (b Backoff) Delay(n int) time.Duration {
	if b.Base <= 0 {
		return 0
	}
	step := b.Step(n)
	if b.Full {
		return time.Duration(rand.Int64N(int64(step)) + 1)
	}
	return step/2 + time.Duration(rand.Int64N(int64(step/2)+1))
}

// Step is the ceiling of the wait before retry n: min(Cap, Base·2ⁿ).
func (b Backoff) Step(n int) time.Duration {
	step := b.Cap
	if step <= 0 {
		step = b.Base
	}
	if n < 0 {
		n = 0
	}
	if n < 62 {
		if d := b.Base << n; d > 0 && d < step {
			step = d
		}
	}
	return step
}

// Sleep waits d or until ctx ends, whichever is first; it returns ctx's
// error in the second case.
func Sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
