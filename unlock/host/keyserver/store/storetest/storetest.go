// Package storetest is the behaviour every store.Store must show, run
// against each implementation so a new one (etcd) can be checked the same way.
package storetest

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store"
)

// Run checks s, which must be empty, against the Store contract.
func Run(t *testing.T, s store.Store) {
	t.Helper()
	ctx := context.Background()
	now := time.Date(2026, 11, 3, 10, 0, 0, 0, time.UTC)

	h := store.Host{
		ID:        "db-1",
		Keys:      []store.SealedKey{{ID: "2026-11", Sealed: []byte{1, 2, 3}, Created: now}},
		TokenHash: []byte{9, 9},
		State:     store.Active,
		Created:   now,
		Updated:   now,
	}

	if _, err := s.Get(ctx, "db-1"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Get on empty store: %v, want ErrNotFound", err)
	}
	if err := s.Create(ctx, h); err != nil {
		t.Fatalf("Create: %v", err)
	}
	if err := s.Create(ctx, h); !errors.Is(err, store.ErrExists) {
		t.Fatalf("second Create: %v, want ErrExists", err)
	}
	got, err := s.Get(ctx, "db-1")
	if err != nil {
		t.Fatalf("Get: %v", err)
	}
	if got.Version != 1 || got.State != store.Active || len(got.Keys) != 1 ||
		string(got.Keys[0].Sealed) != "\x01\x02\x03" || !got.Created.Equal(now) {
		t.Fatalf("Get returned %+v", got)
	}
	// The caller's copy must not alias the store's.
	got.Keys[0].Sealed[0] = 42
	again, _ := s.Get(ctx, "db-1")
	if again.Keys[0].Sealed[0] != 1 {
		t.Fatal("Get result aliases stored data")
	}

	boom := errors.New("boom")
	if _, err := s.Update(ctx, "db-1", func(h *store.Host) error {
		h.State = store.Revoked
		return boom
	}); !errors.Is(err, boom) {
		t.Fatalf("Update with failing fn: %v", err)
	}
	if g, _ := s.Get(ctx, "db-1"); g.State != store.Active || g.Version != 1 {
		t.Fatalf("failed Update changed the record: %+v", g)
	}
	up, err := s.Update(ctx, "db-1", func(h *store.Host) error {
		h.State = store.Revoked
		return nil
	})
	if err != nil || up.Version != 2 || up.State != store.Revoked {
		t.Fatalf("Update: %+v, %v", up, err)
	}
	if _, err := s.Update(ctx, "db-1", func(h *store.Host) error {
		h.ID = "other"
		return nil
	}); err == nil {
		t.Fatal("Update changing the id succeeded")
	}
	if _, err := s.Update(ctx, "nope", func(*store.Host) error { return nil }); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Update of unknown host: %v", err)
	}

	// Concurrent read-modify-writes must not lose updates.
	const n = 8
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := s.Update(ctx, "db-1", func(h *store.Host) error {
				h.Keys = append(h.Keys, store.SealedKey{ID: fmt.Sprint(i)})
				return nil
			})
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("concurrent Update: %v", err)
		}
	}
	if g, _ := s.Get(ctx, "db-1"); len(g.Keys) != 1+n || g.Version != 2+n {
		t.Fatalf("after %d concurrent updates: %d keys, version %d", n, len(g.Keys), g.Version)
	}

	h2 := h
	h2.ID = "a-first"
	if err := s.Create(ctx, h2); err != nil {
		t.Fatalf("Create a-first: %v", err)
	}
	list, err := s.List(ctx)
	if err != nil || len(list) != 2 || list[0].ID != "a-first" || list[1].ID != "db-1" {
		t.Fatalf("List: %v, %v", list, err)
	}
	if err := s.Delete(ctx, "a-first"); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if err := s.Delete(ctx, "a-first"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("second Delete: %v", err)
	}

	if id, err := s.MasterKeyID(ctx, ""); err != nil || id != "" {
		t.Fatalf("MasterKeyID read on fresh store: %q, %v", id, err)
	}
	if id, err := s.MasterKeyID(ctx, "mk1"); err != nil || id != "mk1" {
		t.Fatalf("MasterKeyID(mk1): %q, %v", id, err)
	}
	if id, err := s.MasterKeyID(ctx, "mk2"); err != nil || id != "mk1" {
		t.Fatalf("MasterKeyID(mk2) after mk1: %q, %v (must keep the first)", id, err)
	}

	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := s.Get(cctx, "db-1"); err == nil {
		t.Fatal("Get with a cancelled context succeeded")
	}

	updateEach(t, s)
}

// updateEach checks store.UpdateEach (the store's own batch write, or
// the one-Update-per-id fallback): declined records and missing ids are
// skipped, the others get the change and the next version.
func updateEach(t *testing.T, s store.Store) {
	ctx := context.Background()
	for _, id := range []string{"each-1", "each-2"} {
		if err := s.Create(ctx, store.Host{ID: id, State: store.Active}); err != nil {
			t.Fatal(err)
		}
	}
	seen := time.Date(2026, 12, 7, 3, 0, 0, 0, time.UTC)
	declined := errors.New("declined")
	err := store.UpdateEach(ctx, s, []string{"each-1", "each-absent", "each-2"}, func(h *store.Host) error {
		if h.ID == "each-2" {
			return declined
		}
		h.LastSeen, h.LastSource = seen, "192.0.2.7"
		return nil
	})
	if err != nil {
		t.Fatalf("UpdateEach: %v", err)
	}
	if h, _ := s.Get(ctx, "each-1"); !h.LastSeen.Equal(seen) || h.LastSource != "192.0.2.7" || h.Version != 2 {
		t.Fatalf("UpdateEach: each-1 is %+v", h)
	}
	if h, _ := s.Get(ctx, "each-2"); !h.LastSeen.IsZero() || h.Version != 1 {
		t.Fatalf("UpdateEach changed the declined record: %+v", h)
	}
	if _, err := s.Get(ctx, "each-absent"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("UpdateEach created a record: %v", err)
	}
}
