package argon2

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// mapping is the computation's memory: an anonymous private mapping,
// outside the Go heap so that it is not cleared twice, scanned, or kept by
// the runtime after use.
type mapping struct {
	raw    []byte
	blocks []block
}

// mapBlocks maps n blocks. MADV_HUGEPAGE makes the first pass fault in
// 2 MiB at a time where the kernel has transparent huge pages, which also
// spares the random reference reads most TLB misses: Debian's kernels
// default to "always" (and the advice then asks for compaction when no
// huge page is free), hosts set to "madvise" get them only with it.
// Without huge pages it works the same on 4 KiB pages.
// The pages are not populated up front: the lanes fault their own pages
// in parallel on the first pass.
func mapBlocks(n int) (*mapping, error) {
	size := n * int(unsafe.Sizeof(block{}))
	raw, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("mmap: %w", err)
	}
	// Advice only: a kernel without transparent huge pages says EINVAL
	// and the memory works the same on small pages.
	_ = unix.Madvise(raw, unix.MADV_HUGEPAGE)
	return &mapping{raw: raw, blocks: unsafe.Slice((*block)(unsafe.Pointer(&raw[0])), n)}, nil
}

// unmap gives the memory back to the kernel at once.
func (m *mapping) unmap() {
	if m.raw != nil {
		_ = unix.Munmap(m.raw)
		m.raw, m.blocks = nil, nil
	}
}
