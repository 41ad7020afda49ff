// Package store defines how the key service keeps host records, so the
// HTTP handler and the admin commands don't depend on one database.
//
// The interface is shaped for a replicated store with compare-and-swap
// (etcd) as much as for the local bbolt file: every change is either a
// create-if-absent or a read-modify-write through Update, which such a store
// implements as "read at revision R, write if still at R, else retry".
package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"
)

// State is where a host is in its life: whether it may fetch its keys, and
// whether its current key was ever used to format a volume.
type State string

// Host states. New, Active and Rotating hosts are served their keys (the
// key answer carries the state, keyproto.Response.State); a revoked host
// keeps its sealed keys (the operator may still need them to recover the
// disk) but the server no longer hands them out.
//
//	new ──host confirms "provisioned"──▶ active ──host rotate──▶ rotating
//	                                       ▲                        │
//	                                       └─host confirms "rotated"┘
//	                                         (or host rotate --finish)
const (
	// New: the current key was never used to format anything (host add
	// with a random key). The only state in which a host may format a
	// blank device; left for good once the host confirms.
	New State = "new"
	// Active: the host's volumes use the single current key.
	Active State = "active"
	// Rotating: a next key was put first (host rotate); the older ones are
	// still served until the host confirms it moved to the next one.
	Rotating State = "rotating"
	// Revoked: no keys are served.
	Revoked State = "revoked"
)

// Lifecycle is the state the server acts on. Records written before the
// New and Rotating states existed say "active" with a rotation open (more
// than one key): that is Rotating.
func (h Host) Lifecycle() State {
	if h.State == Active && len(h.Keys) > 1 {
		return Rotating
	}
	return h.State
}

// Serves reports whether the host's keys are handed out in state st.
func (st State) Serves() bool { return st == New || st == Active || st == Rotating }

// SealedKey is one LUKS passphrase of a host, sealed under the master key.
// Sealed is opaque to the store.
type SealedKey struct {
	ID      string    `json:"id"`
	Sealed  []byte    `json:"sealed"`
	Created time.Time `json:"created"`
}

// Host is the record of one host. Keys are ordered as they are served: the
// current key first, then the others during a rotation.
type Host struct {
	ID        string      `json:"id"`
	Keys      []SealedKey `json:"keys"`
	TokenHash []byte      `json:"token_hash,omitempty"`
	State     State       `json:"state"`
	Created   time.Time   `json:"created"`
	Updated   time.Time   `json:"updated"`
	// LastSeen and LastSource are when and from which address (no port)
	// the host last got its keys. The server batches them (see
	// keyserver.LastSeen), so they lag by up to one flush interval and an
	// Update that sets them leaves Updated alone.
	LastSeen   time.Time `json:"last_seen,omitzero"`
	LastSource string    `json:"last_source,omitempty"`
	// Version is managed by the store: 1 after Create, +1 on every Update.
	// It lets callers (and a CAS-based store) detect concurrent changes.
	Version uint64 `json:"version"`
}

// Clone returns a deep copy, so a caller can't alter a store's cached or
// in-flight record through shared slices.
func (h Host) Clone() Host {
	c := h
	c.TokenHash = slices.Clone(h.TokenHash)
	c.Keys = make([]SealedKey, len(h.Keys))
	for i, k := range h.Keys {
		c.Keys[i] = k
		c.Keys[i].Sealed = slices.Clone(k.Sealed)
	}
	return c
}

// ApplyUpdate is the read-modify-write step every Store's Update shares:
// fn changes a copy of cur, which must keep its id, and the result gets the
// next version.
func ApplyUpdate(cur Host, fn func(h *Host) error) (Host, error) {
	h := cur.Clone()
	if err := fn(&h); err != nil {
		return Host{}, err
	}
	if h.ID != cur.ID {
		return Host{}, fmt.Errorf("host %q: update may not change the id to %q", cur.ID, h.ID)
	}
	h.Version = cur.Version + 1
	return h, nil
}

// EncodeNew is the first version of a new record, encoded as the stores
// keep it (JSON).
func EncodeNew(h Host) (Host, []byte, error) {
	if h.ID == "" {
		return Host{}, nil, errors.New("create host: empty id")
	}
	h.Version = 1
	return encode(h)
}

// EncodeUpdate is ApplyUpdate followed by the encoding the stores keep:
// the step every persistent Store's Update shares.
func EncodeUpdate(cur Host, fn func(h *Host) error) (Host, []byte, error) {
	h, err := ApplyUpdate(cur, fn)
	if err != nil {
		return Host{}, nil, err
	}
	return encode(h)
}

func encode(h Host) (Host, []byte, error) {
	val, err := json.Marshal(h)
	if err != nil {
		return Host{}, nil, fmt.Errorf("host %q: encode: %w", h.ID, err)
	}
	return h, val, nil
}

// Errors a Store wraps, so callers can map them to answers with errors.Is.
var (
	ErrNotFound = errors.New("host not found")
	ErrExists   = errors.New("host already exists")
	// ErrBusy: the store could not be reached in time (for bbolt: another
	// process holds the file lock). Worth retrying.
	ErrBusy = errors.New("store busy")
	// ErrCorrupt: the data can't be read as host records.
	ErrCorrupt = errors.New("store data corrupt")
)

// Store keeps host records. Implementations are safe for concurrent use,
// from several goroutines and, for stores backed by files or servers, from
// several processes.
type Store interface {
	// Get returns the record of host id, or an error wrapping ErrNotFound.
	Get(ctx context.Context, id string) (Host, error)
	// List returns every record, ordered by id.
	List(ctx context.Context) ([]Host, error)
	// Create stores a new record (Version is set to 1), or fails with
	// ErrExists without changing anything.
	Create(ctx context.Context, h Host) error
	// Update atomically applies fn to the current record of host id and
	// stores the result with Version+1. If fn returns an error nothing is
	// written and the error is returned. fn may run more than once (a CAS
	// store retries on conflict), so it must not have side effects beyond h.
	// fn may not change h.ID.
	Update(ctx context.Context, id string, fn func(h *Host) error) (Host, error)
	// Delete removes the record of host id (ErrNotFound if absent).
	Delete(ctx context.Context, id string) error
	// MasterKeyID records proposed as the id of the master key the keys are
	// sealed under, if no id is recorded yet, and returns the recorded id.
	// An empty proposal only reads (and may return ""). This lets a server
	// refuse to start with the wrong master key instead of failing per host.
	MasterKeyID(ctx context.Context, proposed string) (string, error)
	// Close releases the store.
	Close() error
}

// EachUpdater is a Store that can change many records in one write
// (boltstore: one transaction, one fsync), for bulk bookkeeping such as
// last-seen times.
type EachUpdater interface {
	// UpdateEach applies fn to the current record of each id as Update
	// does, all in one write. A record fn returns an error for is left
	// alone, as is an id with no record; only a failure of the store
	// itself is returned, and then nothing was written.
	UpdateEach(ctx context.Context, ids []string, fn func(h *Host) error) error
}

// UpdateEach is EachUpdater.UpdateEach on st if it has it, else one
// Update per id (skipping records fn refuses and ids not found).
func UpdateEach(ctx context.Context, st Store, ids []string, fn func(h *Host) error) error {
	if eu, ok := st.(EachUpdater); ok {
		return eu.UpdateEach(ctx, ids, fn)
	}
	for _, id := range ids {
		declined := false
		_, err := st.Update(ctx, id, func(h *Host) error {
			err := fn(h)
			declined = err != nil
			return err
		})
		if err != nil && !declined && !errors.Is(err, ErrNotFound) {
			return fmt.Errorf("host %q: %w", id, err)
		}
	}
	return nil
}
