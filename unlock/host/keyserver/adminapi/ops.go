// Package adminapi is the key service's remote admin API: HTTPS with
// client certificates (mutual TLS) on a listener of its own, apart from the
// port hosts fetch their keys from, so a provider's control plane can enrol,
// rotate and revoke hosts without holding the master key or the data folder.
//
// The operations are keyserver.Admin's; this package only carries them over
// HTTP (Handler), back (Client), and gives the CLI one interface (Ops) that
// either the local data folder (Local) or a remote server (Client) answers,
// so `unlockrd-keyserver host ...` prints the same either way.
package adminapi

import (
	"context"
	"fmt"
	"time"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store"
)

// HostInfo is what the admin API tells about a host: never keys, never
// the token or its hash.
type HostInfo struct {
	Host    string    `json:"host"`
	State   string    `json:"state"`
	Keys    []string  `json:"keys"` // key ids in serving order, current first
	Created time.Time `json:"created"`
	Updated time.Time `json:"updated"`
	// LastSeen and LastSource are recorded by the key server in batches
	// (store.Host); absent until the host has fetched its keys.
	LastSeen   time.Time `json:"last_seen,omitzero"`
	LastSource string    `json:"last_source,omitempty"`
}

// InfoOf describes a store record.
func InfoOf(h store.Host) HostInfo {
	hi := HostInfo{Host: h.ID, State: string(h.Lifecycle()), Created: h.Created, Updated: h.Updated,
		LastSeen: h.LastSeen, LastSource: h.LastSource, Keys: make([]string, 0, len(h.Keys))}
	for _, k := range h.Keys {
		hi.Keys = append(hi.Keys, k.ID)
	}
	return hi
}

// Added is the answer to adding a host. Token exists nowhere else: the
// store keeps only its hash.
type Added struct {
	Host  string `json:"host"`
	Token string `json:"token"`
	KeyID string `json:"key_id"`
}

// Ops are the admin operations, answered by the local data folder (Local)
// or a remote server (Client). Errors name the host.
type Ops interface {
	// Add enrols id with key, or a new random key if key is nil.
	Add(ctx context.Context, id string, key []byte) (Added, error)
	// Rotate makes a new current key and returns its id.
	Rotate(ctx context.Context, id string) (string, error)
	// Finish ends a rotation and returns the ids of the keys dropped.
	Finish(ctx context.Context, id string) ([]string, error)
	// SetState revokes (store.Revoked) or reinstates (store.Active) id.
	SetState(ctx context.Context, id string, st store.State) (HostInfo, error)
	// NewToken replaces the token of id and returns the new one.
	NewToken(ctx context.Context, id string) (string, error)
	// Export returns the unsealed keys of id, in serving order, with their
	// ids. The caller wipes them.
	Export(ctx context.Context, id string) (ids []string, keys [][]byte, err error)
	// Get describes id.
	Get(ctx context.Context, id string) (HostInfo, error)
	// List describes every host, ordered by id.
	List(ctx context.Context) ([]HostInfo, error)
}

// Local answers Ops from a store and sealer in this process, through
// keyserver.Admin.
type Local struct {
	Admin *keyserver.Admin
}

var _ Ops = Local{}

// Add implements Ops.
func (l Local) Add(ctx context.Context, id string, key []byte) (Added, error) {
	token, err := l.Admin.AddHost(ctx, id, key)
	if err != nil {
		return Added{}, err
	}
	a := Added{Host: id, Token: token}
	// The record was just created: its only key is the one made above.
	if h, err := l.Admin.Store.Get(ctx, id); err == nil && len(h.Keys) > 0 {
		a.KeyID = h.Keys[0].ID
	}
	return a, nil
}

// Rotate implements Ops.
func (l Local) Rotate(ctx context.Context, id string) (string, error) {
	return l.Admin.Rotate(ctx, id)
}

// Finish implements Ops.
func (l Local) Finish(ctx context.Context, id string) ([]string, error) {
	return l.Admin.FinishRotation(ctx, id)
}

// SetState implements Ops.
func (l Local) SetState(ctx context.Context, id string, st store.State) (HostInfo, error) {
	if err := l.Admin.SetState(ctx, id, st); err != nil {
		return HostInfo{}, err
	}
	return l.Get(ctx, id)
}

// NewToken implements Ops.
func (l Local) NewToken(ctx context.Context, id string) (string, error) {
	return l.Admin.NewToken(ctx, id)
}

// Export implements Ops.
func (l Local) Export(ctx context.Context, id string) ([]string, [][]byte, error) {
	// Store errors name the host already.
	return l.Admin.Keys(ctx, id)
}

// Get implements Ops.
func (l Local) Get(ctx context.Context, id string) (HostInfo, error) {
	h, err := l.Admin.Store.Get(ctx, id) // its errors name the host
	if err != nil {
		return HostInfo{}, err
	}
	return InfoOf(h), nil
}

// List implements Ops.
func (l Local) List(ctx context.Context) ([]HostInfo, error) {
	hosts, err := l.Admin.Store.List(ctx)
	if err != nil {
		return nil, fmt.Errorf("list hosts: %w", err)
	}
	out := make([]HostInfo, 0, len(hosts))
	for _, h := range hosts {
		out = append(out, InfoOf(h))
	}
	return out, nil
}
