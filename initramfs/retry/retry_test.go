package retry

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestDelayBounds(t *testing.T) {
	for _, full := range []bool{false, true} {
		b := Backoff{Base: time.Second, Cap: 30 * time.Second, Full: full}
		for n := 0; n < 80; n++ {
			step := min(time.Second<<min(n, 20), 30*time.Second)
			if got := b.Step(n); got != step {
				t.Fatalf("Step(%d) = %s, want %s", n, got, step)
			}
			lo := step / 2
			if full {
				lo = 1
			}
			for i := 0; i < 50; i++ {
				if d := b.Delay(n); d < lo || d > step {
					t.Fatalf("full=%v retry %d: %s outside [%s, %s]", full, n, d, lo, step)
				}
			}
		}
	}
}

func TestSleepHonoursContext(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := Sleep(ctx, time.Hour); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Sleep = %v, want the deadline", err)
	}
	if time.Since(start) > 10*time.Second {
		t.Fatal("Sleep ignored the context")
	}
	if err := Sleep(context.Background(), time.Millisecond); err != nil {
		t.Fatal(err)
	}
}
