package store

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
)

// Memory is a Store held in memory, for tests and for embedding the key
// service in a test harness. The zero value is not usable; use NewMemory.
type Memory struct {
	mu       sync.Mutex
	hosts    map[string]Host
	masterID string
}

// NewMemory returns an empty in-memory store.
func NewMemory() *Memory {
	return &Memory{hosts: map[string]Host{}}
}

var _ Store = (*Memory)(nil)

// Get implements Store.
func (m *Memory) Get(ctx context.Context, id string) (Host, error) {
	if err := ctx.Err(); err != nil {
		return Host{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	h, ok := m.hosts[id]
	if !ok {
		return Host{}, fmt.Errorf("host %q: %w", id, ErrNotFound)
	}
	return h.Clone(), nil
}

// List implements Store.
func (m *Memory) List(ctx context.Context) ([]Host, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Host, 0, len(m.hosts))
	for _, h := range m.hosts {
		out = append(out, h.Clone())
	}
	slices.SortFunc(out, func(a, b Host) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

// Create implements Store.
func (m *Memory) Create(ctx context.Context, h Host) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.hosts[h.ID]; ok {
		return fmt.Errorf("host %q: %w", h.ID, ErrExists)
	}
	h = h.Clone()
	h.Version = 1
	m.hosts[h.ID] = h
	return nil
}

// Update implements Store.
func (m *Memory) Update(ctx context.Context, id string, fn func(h *Host) error) (Host, error) {
	if err := ctx.Err(); err != nil {
		return Host{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	cur, ok := m.hosts[id]
	if !ok {
		return Host{}, fmt.Errorf("host %q: %w", id, ErrNotFound)
	}
	h, err := ApplyUpdate(cur, fn)
	if err != nil {
		return Host{}, err
	}
	m.hosts[id] = h.Clone()
	return h, nil
}

// Delete implements Store.
func (m *Memory) Delete(ctx context.Context, id string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.hosts[id]; !ok {
		return fmt.Errorf("host %q: %w", id, ErrNotFound)
	}
	delete(m.hosts, id)
	return nil
}

// MasterKeyID implements Store.
func (m *Memory) MasterKeyID(ctx context.Context, proposed string) (string, error) {
	if err := ctx.Err(); err != nil {
		return "", err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.masterID == "" {
		m.masterID = proposed
	}
	return m.masterID, nil
}

// Close implements Store; the records stay readable.
func (m *Memory) Close() error { return nil }
