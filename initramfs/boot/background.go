package boot

import (
	"context"
	"errors"
	"slices"
	"sync"
)

// background is a stage running beside the pipeline (DESIGN §2: stages
// that don't depend on each other overlap). Its failure stops the pipeline
// at once, so that the failure reaches the console the moment it happens
// rather than when a later stage gives up (a NIC driver that failed to
// load must not wait for the network's two-minute deadline to be told).
type background struct {
	done chan struct{}
	err  error
}

// Wait returns the stage's error once it has finished.
func (b *background) Wait() error {
	<-b.done
	return b.err
}

// failed returns the error of a stage that has finished with one.
func (b *background) failed() error {
	select {
	case <-b.done:
		if b.err != nil && !errors.Is(b.err, context.Canceled) {
			return b.err
		}
	default:
	}
	return nil
}

// group runs the background stages of one boot and remembers them, so
// that a fatal error names every stage that has failed.
type group struct {
	mu   sync.Mutex
	bg   []*background
	stop context.CancelCauseFunc
	ctx  context.Context
}

// errStopped is the cause of the pipeline's end after a background
// failure; the stages still running see it as their context ending.
var errStopped = errors.New("stopped: a stage beside this one failed")

func newGroup(ctx context.Context) *group {
	ctx, stop := context.WithCancelCause(ctx)
	return &group{ctx: ctx, stop: stop}
}

// start runs f in the background.
func (g *group) start(f func(ctx context.Context) error) *background {
	b := &background{done: make(chan struct{})}
	g.mu.Lock()
	g.bg = append(g.bg, b)
	g.mu.Unlock()
	go func() {
		err := f(g.ctx)
		b.err = err
		close(b.done)
		if err != nil && !errors.Is(err, context.Canceled) {
			g.stop(errStopped)
		}
	}()
	return b
}

// fatal turns a foreground stage's error into the boot's end, joined with
// every background failure. After a background failure stopped the boot,
// the other stages are waited for (they were cancelled, so they end
// promptly) so that the error names every stage that failed, and a
// foreground error that is only that stop is left out. A background
// failure halts: it would fail again after a reboot.
func (g *group) fatal(err error, reboot bool) error {
	g.mu.Lock()
	bg := slices.Clone(g.bg)
	g.mu.Unlock()
	if errors.Is(context.Cause(g.ctx), errStopped) {
		for _, b := range bg {
			b.Wait()
		}
	}
	var errs []error
	for _, b := range bg {
		if e := b.failed(); e != nil {
			errs = append(errs, e)
		}
	}
	if len(errs) > 0 {
		if err != nil && !errors.Is(err, context.Canceled) && !slices.Contains(errs, err) {
			errs = append(errs, err)
		}
		return &Fatal{Err: errors.Join(errs...)}
	}
	return &Fatal{Err: err, Reboot: reboot}
}
