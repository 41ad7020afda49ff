// Package boltstore keeps host records in a single bbolt file.
//
// bbolt allows one read-write opener per file (an exclusive flock) and any
// number of read-only openers (a shared flock). To let the admin commands
// change hosts while the server runs on the same file, this store holds the
// file only for the length of one operation: reads open it read-only,
// writes open it read-write, both waiting up to a lock timeout for the
// other side. Records are tiny and the file is a few pages, so an open per
// operation costs well under a millisecond; a write is fsync'd (data, then
// meta page) before the operation returns.
package boltstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store"
)

// Schema identifies our data files; a bbolt file without it is someone
// else's, and we refuse to touch it.
const Schema = "unlockrd-hosts/1"

var (
	bucketMeta  = []byte("meta")
	bucketHosts = []byte("hosts")
	keySchema   = []byte("schema")
	keyMasterID = []byte("master-key-id")
)

// DefaultLockTimeout is how long an operation waits for another process
// (the server or an admin command) to let go of the file.
const DefaultLockTimeout = 5 * time.Second

// Options tune Open.
type Options struct {
	// Create makes an empty data file if path does not exist.
	Create bool
	// LockTimeout bounds the wait for the file lock; 0 means
	// DefaultLockTimeout. A context deadline that is sooner wins.
	LockTimeout time.Duration
}

// Store is a store.Store over one bbolt file. It holds no lock between
// operations, so several Stores (in this or other processes) may share a
// path. Reads come from a snapshot checked against the file's last commit
// at every read (snapshot.go).
type Store struct {
	path        string
	lockTimeout time.Duration
	snap        snapState // see snapshot.go
	opens       atomic.Int64
}

var _ store.Store = (*Store)(nil)

// Open checks that path is an unlockrd data file (creating it if asked) and
// returns a Store for it.
func Open(path string, o Options) (*Store, error) {
	s := &Store{path: path, lockTimeout: o.LockTimeout}
	if s.lockTimeout <= 0 {
		s.lockTimeout = DefaultLockTimeout
	}
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) && o.Create {
		if err := create(path); err != nil {
			return nil, err
		}
	}
	if err := s.view(context.Background(), func(*bolt.Tx) error { return nil }); err != nil {
		return nil, err
	}
	return s, nil
}

// Path returns the data file's path.
func (s *Store) Path() string { return s.path }

// create builds the file under a temporary name and links it into place,
// so no opener ever sees a half-initialised file and two concurrent
// creators can't clobber each other.
func create(path string) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".new-*")
	if err != nil {
		return fmt.Errorf("create data file %s: %w", path, err)
	}
	tmpName := tmp.Name()
	tmp.Close()
	defer os.Remove(tmpName)
	// bbolt initialises only an empty file; CreateTemp made it 0600.
	db, err := bolt.Open(tmpName, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		return fmt.Errorf("create data file %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		meta, err := tx.CreateBucket(bucketMeta)
		if err != nil {
			return err
		}
		if _, err := tx.CreateBucket(bucketHosts); err != nil {
			return err
		}
		return meta.Put(keySchema, []byte(Schema))
	})
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("create data file %s: %w", path, err)
	}
	if err := os.Link(tmpName, path); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("create data file %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		// Make the new directory entry durable too.
		err = d.Sync()
		d.Close()
		if err != nil {
			return fmt.Errorf("create data file %s: sync %s: %w", path, dir, err)
		}
	}
	return nil
}

// open opens the file for one operation.
func (s *Store) open(ctx context.Context, readOnly bool) (*bolt.DB, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("data file %s: %w", s.path, err)
	}
	timeout := s.lockTimeout
	if dl, ok := ctx.Deadline(); ok {
		if left := time.Until(dl); left < timeout {
			timeout = max(left, time.Millisecond)
		}
	}
	// bbolt formats an empty file as a new database when it opens it
	// read-write; an empty file here means something truncated ours, and
	// silently starting over would drop every host.
	fi, err := os.Stat(s.path)
	if err != nil {
		return nil, fmt.Errorf("data file %s: %w", s.path, err)
	}
	if fi.Size() == 0 {
		return nil, fmt.Errorf("data file %s is empty: %w", s.path, store.ErrCorrupt)
	}
	s.opens.Add(1)
	db, err := bolt.Open(s.path, 0o600, &bolt.Options{
		Timeout:  timeout,
		ReadOnly: readOnly,
		OpenFile: func(name string, flag int, perm os.FileMode) (*os.File, error) {
			return os.OpenFile(name, flag&^os.O_CREATE, perm)
		},
	})
	if err != nil {
		switch {
		case errors.Is(err, bolterrors.ErrTimeout):
			return nil, fmt.Errorf("data file %s: locked by another process for %v: %w", s.path, timeout, store.ErrBusy)
		case errors.Is(err, bolterrors.ErrInvalid), errors.Is(err, bolterrors.ErrChecksum),
			errors.Is(err, bolterrors.ErrVersionMismatch):
			return nil, fmt.Errorf("data file %s is not a readable database (%v): %w", s.path, err, store.ErrCorrupt)
		}
		return nil, fmt.Errorf("data file %s: %w", s.path, err)
	}
	return db, nil
}

// run opens the file, runs fn in one transaction and closes it again.
// bbolt trusts its pages and panics on some corruptions (while opening, for
// a bad freelist, or while reading); a recovered panic becomes ErrCorrupt
// instead of taking the server down.
func (s *Store) run(ctx context.Context, write bool, fn func(tx *bolt.Tx) error) (err error) {
	// A bad page offset can also point outside the mapping; without this
	// the resulting fault would kill the process instead of panicking.
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	var db *bolt.DB
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("data file %s: %v: %w", s.path, r, store.ErrCorrupt)
		}
		if db != nil {
			if cerr := db.Close(); cerr != nil && err == nil {
				err = fmt.Errorf("data file %s: close: %w", s.path, cerr)
			}
		}
	}()
	if db, err = s.open(ctx, !write); err != nil {
		return err
	}
	body := func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		if meta == nil || tx.Bucket(bucketHosts) == nil || string(meta.Get(keySchema)) != Schema {
			return fmt.Errorf("data file %s is not an unlockrd host database (want schema %s): %w",
				s.path, Schema, store.ErrCorrupt)
		}
		return fn(tx)
	}
	if write {
		return db.Update(body)
	}
	return db.View(body)
}

func (s *Store) view(ctx context.Context, fn func(tx *bolt.Tx) error) error {
	return s.run(ctx, false, fn)
}

func (s *Store) update(ctx context.Context, fn func(tx *bolt.Tx) error) error {
	return s.run(ctx, true, fn)
}

func (s *Store) decode(key, val []byte) (store.Host, error) {
	var h store.Host
	if err := json.Unmarshal(val, &h); err != nil {
		return h, fmt.Errorf("data file %s: record %q: %v: %w", s.path, key, err, store.ErrCorrupt)
	}
	if h.ID != string(key) {
		return h, fmt.Errorf("data file %s: record %q holds host %q: %w", s.path, key, h.ID, store.ErrCorrupt)
	}
	return h, nil
}

// Get implements store.Store.
func (s *Store) Get(ctx context.Context, id string) (store.Host, error) {
	if err := ctx.Err(); err != nil {
		return store.Host{}, fmt.Errorf("data file %s: %w", s.path, err)
	}
	if sn := s.current(ctx); sn != nil {
		h, ok := sn.hosts[id]
		if !ok {
			return store.Host{}, fmt.Errorf("host %q: %w", id, store.ErrNotFound)
		}
		return h.Clone(), nil
	}
	var h store.Host
	err := s.view(ctx, func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketHosts).Get([]byte(id))
		if v == nil {
			return fmt.Errorf("host %q: %w", id, store.ErrNotFound)
		}
		var err error
		h, err = s.decode([]byte(id), v)
		return err
	})
	return h, err
}

// List implements store.Store; bbolt keeps keys sorted, so the records
// come out ordered by id.
func (s *Store) List(ctx context.Context) ([]store.Host, error) {
	var out []store.Host
	err := s.view(ctx, func(tx *bolt.Tx) error {
		return tx.Bucket(bucketHosts).ForEach(func(k, v []byte) error {
			h, err := s.decode(k, v)
			if err != nil {
				return err
			}
			out = append(out, h)
			return nil
		})
	})
	return out, err
}

// Create implements store.Store.
func (s *Store) Create(ctx context.Context, h store.Host) error {
	h, val, err := store.EncodeNew(h)
	if err != nil {
		return err
	}
	return s.update(ctx, func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketHosts)
		if b.Get([]byte(h.ID)) != nil {
			return fmt.Errorf("host %q: %w", h.ID, store.ErrExists)
		}
		return b.Put([]byte(h.ID), val)
	})
}

// Update implements store.Store. The read and the write happen in one
// bbolt write transaction, which is exclusive across processes, so fn runs
// exactly once.
func (s *Store) Update(ctx context.Context, id string, fn func(h *store.Host) error) (store.Host, error) {
	var out store.Host
	err := s.update(ctx, func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketHosts)
		v := b.Get([]byte(id))
		if v == nil {
			return fmt.Errorf("host %q: %w", id, store.ErrNotFound)
		}
		cur, err := s.decode([]byte(id), v)
		if err != nil {
			return err
		}
		h, val, err := store.EncodeUpdate(cur, fn)
		if err != nil {
			return err
		}
		out = h
		return b.Put([]byte(id), val)
	})
	if err != nil {
		return store.Host{}, err
	}
	return out, nil
}

// UpdateEach implements store.EachUpdater in one write transaction: one
// open, one fsync and one snapshot reload for the whole batch.
func (s *Store) UpdateEach(ctx context.Context, ids []string, fn func(h *store.Host) error) error {
	return s.update(ctx, func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketHosts)
		for _, id := range ids {
			v := b.Get([]byte(id))
			if v == nil {
				continue
			}
			cur, err := s.decode([]byte(id), v)
			if err != nil {
				return err
			}
			_, val, err := store.EncodeUpdate(cur, fn)
			if err != nil {
				continue // fn declined this record
			}
			if err := b.Put([]byte(id), val); err != nil {
				return err
			}
		}
		return nil
	})
}

// Delete implements store.Store.
func (s *Store) Delete(ctx context.Context, id string) error {
	return s.update(ctx, func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketHosts)
		if b.Get([]byte(id)) == nil {
			return fmt.Errorf("host %q: %w", id, store.ErrNotFound)
		}
		return b.Delete([]byte(id))
	})
}

// MasterKeyID implements store.Store. It takes the write lock only when
// nothing is recorded yet, which happens once per file.
func (s *Store) MasterKeyID(ctx context.Context, proposed string) (string, error) {
	if err := ctx.Err(); err != nil {
		return "", fmt.Errorf("data file %s: %w", s.path, err)
	}
	if sn := s.current(ctx); sn != nil && (sn.masterID != "" || proposed == "") {
		return sn.masterID, nil
	}
	var got string
	err := s.view(ctx, func(tx *bolt.Tx) error {
		got = string(tx.Bucket(bucketMeta).Get(keyMasterID))
		return nil
	})
	if err != nil || got != "" || proposed == "" {
		return got, err
	}
	err = s.update(ctx, func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		if got = string(meta.Get(keyMasterID)); got != "" {
			return nil
		}
		got = proposed
		return meta.Put(keyMasterID, []byte(strings.Clone(proposed)))
	})
	return got, err
}

// Close implements store.Store. Only the descriptor for reading the meta
// pages is held between operations (with no lock).
func (s *Store) Close() error {
	s.snap.meta.close()
	return nil
}
