package keyserver

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store"
	"github.com/unlockrd/unlockrd/unlock/keyproto"
)

// KeySize is the length of the random LUKS passphrase made for each host.
const KeySize = 32

// MaxKeySize bounds an enrolled key, well inside keyproto.MaxBody once
// base64-encoded with a few rotation keys.
const MaxKeySize = 8 << 10

// ErrRotating is returned when a rotation is started while one is open.
var ErrRotating = errors.New("rotation in progress")

// Admin performs the operator's host changes. Everything goes through the
// store's Create/Update, so it is safe to use while a server (in this or
// another process) serves the same store.
type Admin struct {
	Store  store.Store
	Sealer *Sealer
	// Now is the clock for timestamps and key ids; nil means time.Now.
	Now func() time.Time
}

func (a *Admin) now() time.Time {
	if a.Now != nil {
		return a.Now().UTC()
	}
	return time.Now().UTC()
}

// keyID names a new key after the month it was made ("2026-11"), with a
// counter when a host gets more than one key in a month ("2026-11.2").
func keyID(now time.Time, existing []store.SealedKey) string {
	base := now.Format("2006-01")
	taken := func(id string) bool {
		return slices.ContainsFunc(existing, func(k store.SealedKey) bool { return k.ID == id })
	}
	id := base
	for n := 2; taken(id); n++ {
		id = base + "." + strconv.Itoa(n)
	}
	return id
}

func randomKey() ([]byte, error) {
	k := make([]byte, KeySize)
	if _, err := rand.Read(k); err != nil {
		return nil, fmt.Errorf("new key: %w", err)
	}
	return k, nil
}

// AddHost enrolls host id with a new random key, or with key if it is not
// nil (enrolling a disk that already has a passphrase). It returns the
// bearer token, which exists nowhere else afterwards. A random key starts
// in state New (it has formatted nothing: the host may provision a blank
// volume with it); an enrolled key is in use already, so Active.
func (a *Admin) AddHost(ctx context.Context, id string, key []byte) (token string, err error) {
	if err := ValidHostID(id); err != nil {
		return "", err
	}
	state := store.Active
	if key == nil {
		state = store.New
		if key, err = randomKey(); err != nil {
			return "", err
		}
		defer clear(key)
	} else if len(key) == 0 || len(key) > MaxKeySize {
		return "", fmt.Errorf("host %q: key is %d bytes, want 1 to %d", id, len(key), MaxKeySize)
	}
	now := a.now()
	kid := keyID(now, nil)
	sealed, err := a.Sealer.Seal(id, kid, key)
	if err != nil {
		return "", err
	}
	token, hash, err := NewToken()
	if err != nil {
		return "", err
	}
	h := store.Host{
		ID:        id,
		Keys:      []store.SealedKey{{ID: kid, Sealed: sealed, Created: now}},
		TokenHash: hash,
		State:     state,
		Created:   now,
		Updated:   now,
	}
	if err := a.Store.Create(ctx, h); err != nil {
		return "", fmt.Errorf("add host %q: %w", id, err)
	}
	return token, nil
}

// Rotate gives host id a new random current key and puts it in state
// Rotating; the old one is served second until the host confirms the
// rotation (Confirm) or FinishRotation, so a host that boots meanwhile
// still opens its disk while the new key is being added to it. It returns
// the new key's id. A revoked host stays revoked.
func (a *Admin) Rotate(ctx context.Context, id string) (string, error) {
	key, err := randomKey()
	if err != nil {
		return "", err
	}
	defer clear(key)
	now := a.now()
	var kid string
	_, err = a.Store.Update(ctx, id, func(h *store.Host) error {
		if len(h.Keys) > 1 {
			return fmt.Errorf("host %q: %w (keys %s); finish it first", id, ErrRotating, keyIDs(h.Keys))
		}
		kid = keyID(now, h.Keys)
		sealed, err := a.Sealer.Seal(id, kid, key)
		if err != nil {
			return err
		}
		h.Keys = append([]store.SealedKey{{ID: kid, Sealed: sealed, Created: now}}, h.Keys...)
		if h.State != store.Revoked {
			h.State = store.Rotating
		}
		h.Updated = now
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("rotate host %q: %w", id, err)
	}
	return kid, nil
}

// FinishRotation drops every key of host id but the current one and returns
// the ids it dropped (none if no rotation was open). The operator's way to
// end a rotation the host cannot confirm (volumes moved by hand).
func (a *Admin) FinishRotation(ctx context.Context, id string) ([]string, error) {
	now := a.now()
	var dropped []string
	_, err := a.Store.Update(ctx, id, func(h *store.Host) error {
		dropped = nil
		if h.Lifecycle() == store.Rotating {
			h.State = store.Active
			h.Updated = now
		}
		if len(h.Keys) <= 1 {
			return nil
		}
		for _, k := range h.Keys[1:] {
			dropped = append(dropped, k.ID)
		}
		h.Keys = h.Keys[:1]
		h.Updated = now
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("finish rotation of host %q: %w", id, err)
	}
	return dropped, nil
}

// SetState revokes (store.Revoked) or reinstates (store.Active) host id.
// A reinstated host comes back Rotating if a rotation is open, else
// Active; never New: whether its key formatted something while it was
// revoked is unknown, so it is taken as used.
func (a *Admin) SetState(ctx context.Context, id string, st store.State) error {
	if st != store.Active && st != store.Revoked {
		return fmt.Errorf("host %q: unknown state %q", id, st)
	}
	now := a.now()
	_, err := a.Store.Update(ctx, id, func(h *store.Host) error {
		want := st
		if st == store.Active {
			if h.State != store.Revoked {
				return nil // not revoked: nothing to reinstate
			}
			if len(h.Keys) > 1 {
				want = store.Rotating
			}
		}
		if h.State != want {
			h.State = want
			h.Updated = now
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("set host %q %s: %w", id, st, err)
	}
	return nil
}

// NewToken replaces the token of host id (the old one stops working at
// once) and returns the new one.
func (a *Admin) NewToken(ctx context.Context, id string) (string, error) {
	token, hash, err := NewToken()
	if err != nil {
		return "", err
	}
	now := a.now()
	if _, err := a.Store.Update(ctx, id, func(h *store.Host) error {
		h.TokenHash = hash
		h.Updated = now
		return nil
	}); err != nil {
		return "", fmt.Errorf("new token for host %q: %w", id, err)
	}
	return token, nil
}

// Keys returns the unsealed keys of host id in serving order with their
// ids. The caller must wipe them (keyproto.Wipe).
func (a *Admin) Keys(ctx context.Context, id string) (ids []string, keys [][]byte, err error) {
	h, err := a.Store.Get(ctx, id)
	if err != nil {
		return nil, nil, err
	}
	return UnsealAll(a.Sealer, h)
}

// UnsealAll opens every key of h, in order. On error nothing is returned
// and whatever was opened is wiped.
func UnsealAll(s *Sealer, h store.Host) (ids []string, keys [][]byte, err error) {
	for _, k := range h.Keys {
		b, err := s.Unseal(h.ID, k.ID, k.Sealed)
		if err != nil {
			for _, o := range keys {
				clear(o)
			}
			return nil, nil, err
		}
		ids = append(ids, k.ID)
		keys = append(keys, b)
	}
	if len(keys) == 0 {
		return nil, nil, fmt.Errorf("host %q has no keys", h.ID)
	}
	return ids, keys, nil
}

func keyIDs(ks []store.SealedKey) string {
	s := ""
	for i, k := range ks {
		if i > 0 {
			s += ", "
		}
		s += k.ID
	}
	return s
}

// ErrConfirm is wrapped when a host's confirmation does not fit its
// record (wrong key id, or an event its state does not expect).
var ErrConfirm = errors.New("confirmation refused")

// Confirm records what host id reports about its volumes (the
// confirmation request, keyproto.Confirmation):
//
//   - provisioned with the current key: New becomes Active, so the server
//     never says "new" for this host again. Repeating it once Active is
//     accepted (the host may not have seen the first answer).
//   - rotated to the current key: the other keys are dropped and the state
//     becomes Active; repeating it is accepted likewise.
//
// Anything else (another key id, a revoked host, provisioned during a
// rotation) is refused with ErrConfirm and changes nothing. It returns
// the state after the change and whether anything changed.
func (a *Admin) Confirm(ctx context.Context, id string, c keyproto.Confirmation) (store.State, bool, error) {
	if err := c.Validate(); err != nil {
		return "", false, fmt.Errorf("host %q: %w: %v", id, ErrConfirm, err)
	}
	now := a.now()
	var changed bool
	rec, err := a.Store.Update(ctx, id, func(h *store.Host) error {
		changed = false
		st := h.Lifecycle()
		if !st.Serves() {
			return fmt.Errorf("host %q is %s: %w", id, st, ErrConfirm)
		}
		if len(h.Keys) == 0 || h.Keys[0].ID != c.Key {
			return fmt.Errorf("host %q: %w: %s names key %q, the current key is %q", id, ErrConfirm, c.Event, c.Key, keyIDs(h.Keys[:min(1, len(h.Keys))]))
		}
		switch {
		case c.Event == keyproto.EventProvisioned && st == store.New:
			h.State = store.Active
		case c.Event == keyproto.EventRotated && st == store.Rotating:
			h.Keys = h.Keys[:1]
			h.State = store.Active
		case st == store.Active:
			return nil // a repeat: already recorded
		default:
			return fmt.Errorf("host %q: %w: %s while %s", id, ErrConfirm, c.Event, st)
		}
		h.Updated = now
		changed = true
		return nil
	})
	if err != nil {
		return "", false, err
	}
	return rec.State, changed, nil
}
