package keyserver

import (
	"context"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/ulog/ulogtest"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store"
)

func TestLastSeenBatches(t *testing.T) {
	ctx := context.Background()
	st := store.NewMemory()
	t0 := time.Date(2026, 12, 7, 2, 0, 0, 0, time.UTC)
	for _, id := range []string{"a", "b", "gone"} {
		if err := st.Create(ctx, store.Host{ID: id, State: store.Active}); err != nil {
			t.Fatal(err)
		}
	}
	// b was seen later by another replica.
	if _, err := st.Update(ctx, "b", func(h *store.Host) error { h.LastSeen = t0.Add(time.Hour); return nil }); err != nil {
		t.Fatal(err)
	}
	l := NewLastSeen(st, ulogtest.New(t))
	for i := range 5 {
		l.Observe(AuditEvent{Time: t0.Add(time.Duration(i) * time.Second), Remote: "192.0.2.1:4000", Host: "a", Outcome: OutcomeOK})
	}
	l.Observe(AuditEvent{Time: t0, Remote: "[2001:db8::1]:443", Host: "b", Outcome: OutcomeOK})
	l.Observe(AuditEvent{Time: t0, Remote: "192.0.2.9:1", Host: "gone", Outcome: OutcomeOK})
	l.Observe(AuditEvent{Time: t0.Add(time.Minute), Remote: "192.0.2.9:1", Host: "a", Outcome: OutcomeBadToken})
	if n := l.Pending(); n != 3 {
		t.Fatalf("pending %d, want 3", n)
	}
	if err := st.Delete(ctx, "gone"); err != nil {
		t.Fatal(err)
	}
	if err := l.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	a, _ := st.Get(ctx, "a")
	if !a.LastSeen.Equal(t0.Add(4*time.Second)) || a.LastSource != "192.0.2.1" || a.Version != 2 {
		t.Fatalf("a: %v %q version %d (want the latest ok, one write)", a.LastSeen, a.LastSource, a.Version)
	}
	if b, _ := st.Get(ctx, "b"); !b.LastSeen.Equal(t0.Add(time.Hour)) || b.Version != 2 {
		t.Fatalf("b: older sighting overwrote a newer one: %v version %d", b.LastSeen, b.Version)
	}
	if n := l.Pending(); n != 0 {
		t.Fatalf("pending %d after flush", n)
	}
	if err := l.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if a2, _ := st.Get(ctx, "a"); a2.Version != a.Version {
		t.Fatal("empty flush wrote")
	}
}
