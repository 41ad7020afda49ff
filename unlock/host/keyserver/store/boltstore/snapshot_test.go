package boltstore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store"
)

// A reader (the server) and a writer (an admin command) on one file: every
// commit is seen by the next read, however fast they follow each other,
// and reads between commits don't open the file.
func TestSnapshotSeesEveryCommit(t *testing.T) {
	p := filepath.Join(t.TempDir(), "hosts.db")
	w, err := Open(p, Options{Create: true})
	if err != nil {
		t.Fatal(err)
	}
	r, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	ctx := context.Background()
	if err := w.Create(ctx, store.Host{ID: "h", State: store.Active}); err != nil {
		t.Fatal(err)
	}
	// Concurrent readers must never see the record go back in time.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errc := make(chan error, 4)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var last uint64
			for {
				select {
				case <-stop:
					return
				default:
				}
				h, err := r.Get(ctx, "h")
				if err != nil || h.Version < last {
					errc <- fmt.Errorf("read %+v after version %d: %v", h, last, err)
					return
				}
				last = h.Version
			}
		}()
	}
	for i := range 300 {
		up, err := w.Update(ctx, "h", func(h *store.Host) error {
			h.Keys = append(h.Keys, store.SealedKey{ID: fmt.Sprint(i)})
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		got, err := r.Get(ctx, "h")
		if err != nil || got.Version != up.Version || len(got.Keys) != i+1 {
			t.Fatalf("after update %d (version %d): read %d keys, version %d, %v", i, up.Version, len(got.Keys), got.Version, err)
		}
		if i%50 == 0 {
			name := fmt.Sprint("new-", i)
			if err := w.Create(ctx, store.Host{ID: name, State: store.Active}); err != nil {
				t.Fatal(err)
			}
			if _, err := r.Get(ctx, name); err != nil {
				t.Fatalf("host created just before: %v", err)
			}
		}
	}
	close(stop)
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}

	before := r.opens.Load()
	for range 100 {
		if _, err := r.Get(ctx, "h"); err != nil {
			t.Fatal(err)
		}
		if _, err := r.Get(ctx, "nope"); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("unknown host: %v", err)
		}
	}
	if n := r.opens.Load() - before; n != 0 {
		t.Fatalf("200 reads without a commit opened the file %d times", n)
	}
	// The snapshot is the store's: callers get copies.
	h, _ := r.Get(ctx, "h")
	h.Keys[0].ID = "changed"
	if h2, _ := r.Get(ctx, "h"); h2.Keys[0].ID == "changed" {
		t.Fatal("Get result aliases the snapshot")
	}
}

// A file replaced by another (a restore) is read anew.
func TestSnapshotFileReplaced(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "hosts.db")
	a, err := Open(p, Options{Create: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	a.Create(ctx, store.Host{ID: "old", State: store.Active})
	if _, err := a.Get(ctx, "old"); err != nil {
		t.Fatal(err)
	}
	q := filepath.Join(dir, "other.db")
	b, err := Open(q, Options{Create: true})
	if err != nil {
		t.Fatal(err)
	}
	b.Create(ctx, store.Host{ID: "restored", State: store.Active})
	if err := os.Rename(q, p); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Get(ctx, "old"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("host of the replaced file: %v", err)
	}
	if _, err := a.Get(ctx, "restored"); err != nil {
		t.Fatalf("host of the new file: %v", err)
	}
}

// Damaged meta pages under a live snapshot: reads fail as corrupt, they
// don't go on serving what was cached.
func TestSnapshotMetaDamaged(t *testing.T) {
	p := filepath.Join(t.TempDir(), "hosts.db")
	s, err := Open(p, Options{Create: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	s.Create(ctx, store.Host{ID: "h", State: store.Active})
	if _, err := s.Get(ctx, "h"); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	junk := make([]byte, 64)
	for i := range junk {
		junk[i] = 0x5a
	}
	f.WriteAt(junk, pageHeaderLen)
	f.WriteAt(junk, int64(pageSize)+pageHeaderLen)
	f.Close()
	if _, err := s.Get(ctx, "h"); !errors.Is(err, store.ErrCorrupt) {
		t.Fatalf("read after the meta pages were damaged: %v", err)
	}
}
