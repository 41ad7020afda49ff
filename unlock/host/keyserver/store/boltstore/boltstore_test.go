package boltstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store/storetest"
)

func TestContract(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "hosts.db"), Options{Create: true})
	if err != nil {
		t.Fatal(err)
	}
	storetest.Run(t, s)
}

func TestOpenMissingWithoutCreate(t *testing.T) {
	_, err := Open(filepath.Join(t.TempDir(), "hosts.db"), Options{})
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("got %v, want not-exist", err)
	}
}

func TestFileMode(t *testing.T) {
	p := filepath.Join(t.TempDir(), "hosts.db")
	if _, err := Open(p, Options{Create: true}); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, want 0600", fi.Mode().Perm())
	}
}

func TestCorruptFiles(t *testing.T) {
	for _, tc := range []struct {
		name  string
		write func(t *testing.T, p string)
	}{
		{"garbage", func(t *testing.T, p string) {
			os.WriteFile(p, []byte(strings.Repeat("not a database ", 1000)), 0o600)
		}},
		{"empty", func(t *testing.T, p string) { os.WriteFile(p, nil, 0o600) }},
		{"foreign bbolt", func(t *testing.T, p string) {
			db, err := bolt.Open(p, 0o600, nil)
			if err != nil {
				t.Fatal(err)
			}
			db.Update(func(tx *bolt.Tx) error { _, err := tx.CreateBucket([]byte("x")); return err })
			db.Close()
		}},
		{"bad record", func(t *testing.T, p string) {
			if _, err := Open(p, Options{Create: true}); err != nil {
				t.Fatal(err)
			}
			db, err := bolt.Open(p, 0o600, nil)
			if err != nil {
				t.Fatal(err)
			}
			db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketHosts).Put([]byte("h"), []byte("{")) })
			db.Close()
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "hosts.db")
			tc.write(t, p)
			s, err := Open(p, Options{})
			if err == nil {
				_, err = s.List(context.Background())
			}
			if !errors.Is(err, store.ErrCorrupt) {
				t.Fatalf("got %v, want ErrCorrupt", err)
			}
			if !strings.Contains(err.Error(), p) {
				t.Fatalf("error %q does not name the file", err)
			}
		})
	}
}

// A writer that holds the file longer than the reader's lock timeout makes
// the reader fail with ErrBusy rather than hang.
func TestBusy(t *testing.T) {
	p := filepath.Join(t.TempDir(), "hosts.db")
	if _, err := Open(p, Options{Create: true}); err != nil {
		t.Fatal(err)
	}
	db, err := bolt.Open(p, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	s := &Store{path: p, lockTimeout: 100 * time.Millisecond}
	_, err = s.List(context.Background())
	db.Close()
	if !errors.Is(err, store.ErrBusy) {
		t.Fatalf("got %v, want ErrBusy", err)
	}
	if _, err := s.List(context.Background()); err != nil {
		t.Fatalf("after the writer left: %v", err)
	}
}

// Two Stores on one path, as the server and an admin command are, see each
// other's writes.
func TestSharedPath(t *testing.T) {
	p := filepath.Join(t.TempDir(), "hosts.db")
	a, err := Open(p, Options{Create: true})
	if err != nil {
		t.Fatal(err)
	}
	b, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := a.Create(ctx, store.Host{ID: "x", State: store.Active}); err != nil {
		t.Fatal(err)
	}
	if h, err := b.Get(ctx, "x"); err != nil || h.ID != "x" {
		t.Fatalf("b.Get: %+v %v", h, err)
	}
}

// Damage to any page of the file gives an error or (if the damage missed
// everything read) a clean result, never a crash: bbolt panics on some bad
// pages, and the store turns that into ErrCorrupt.
func TestDamagedPages(t *testing.T) {
	if raceEnabled {
		t.Skip("checkptr makes damaged-page reads fatal")
	}
	dir := t.TempDir()
	p := filepath.Join(dir, "hosts.db")
	s, err := Open(p, Options{Create: true})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		if err := s.Create(context.Background(), store.Host{ID: fmt.Sprintf("host-%03d", i), State: store.Active,
			Keys: []store.SealedKey{{ID: "k", Sealed: make([]byte, 60)}}}); err != nil {
			t.Fatal(err)
		}
	}
	orig, _ := os.ReadFile(p)
	pages := len(orig) / 4096
	for pg := 2; pg < pages; pg++ {
		for _, off := range []int{0, 16, 100} {
			b := bytes.Clone(orig)
			for i := pg*4096 + off; i < pg*4096+off+64; i++ {
				b[i] ^= 0x5a
			}
			q := filepath.Join(dir, fmt.Sprintf("d-%d-%d.db", pg, off))
			os.WriteFile(q, b, 0o600)
			s, err := Open(q, Options{})
			if err == nil {
				_, err = s.List(context.Background())
			}
			if err != nil && !errors.Is(err, store.ErrCorrupt) {
				t.Errorf("page %d+%d: %v", pg, off, err)
			}
		}
	}
}

// Writers too: a read-write open loads the freelist, which may be the
// damaged page.
func TestDamagedPagesWrite(t *testing.T) {
	if raceEnabled {
		t.Skip("checkptr makes damaged-page reads fatal")
	}
	dir := t.TempDir()
	p := filepath.Join(dir, "hosts.db")
	s, err := Open(p, Options{Create: true})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		s.Create(context.Background(), store.Host{ID: fmt.Sprintf("host-%03d", i), State: store.Active})
		if i%3 == 0 {
			s.Delete(context.Background(), fmt.Sprintf("host-%03d", i))
		}
	}
	orig, _ := os.ReadFile(p)
	for pg := 2; pg < len(orig)/4096; pg++ {
		b := bytes.Clone(orig)
		for i := pg * 4096; i < pg*4096+64; i++ {
			b[i] ^= 0x5a
		}
		q := filepath.Join(dir, fmt.Sprintf("d-%d.db", pg))
		os.WriteFile(q, b, 0o600)
		s := &Store{path: q, lockTimeout: time.Second}
		err := s.Create(context.Background(), store.Host{ID: "new", State: store.Active})
		if err != nil && !errors.Is(err, store.ErrCorrupt) {
			t.Errorf("page %d: %v", pg, err)
		}
	}
}
