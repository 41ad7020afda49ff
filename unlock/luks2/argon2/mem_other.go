//go:build !linux

package argon2

// mapping is the computation's memory; off Linux (tests and tools only)
// it is ordinary heap memory.
type mapping struct{ blocks []block }

func mapBlocks(n int) (*mapping, error) { return &mapping{blocks: make([]block, n)}, nil }

func (m *mapping) unmap() { m.blocks = nil }
