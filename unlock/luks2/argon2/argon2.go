// Package argon2 is Argon2 (RFC 9106, version 0x13) for unsealing LUKS2
// keyslots in PID 1, with its memory outside the Go heap.
//
// golang.org/x/crypto/argon2 computes the same function, but it allocates
// its memory itself on the Go heap and takes no context. On cryptsetup's
// default keyslot (argon2id, 0.6–1 GiB) that costs PID 1 more than the
// arithmetic does: every page of a fresh heap span faults twice (x/crypto
// XORs into the memory on the first pass too, so a read maps the zero page
// and the write copies it), the runtime clears reused spans again, the
// heap keeps the gigabyte until a forced scavenge, and a deadline cannot
// stop it. Here the memory is one anonymous mapping advised for huge pages,
// written (not read) on the first pass, wiped by the lanes in parallel and
// unmapped before Key returns; passes check ctx. The arithmetic is plain
// Go: the workload is bound by memory latency, and x/crypto's SSE4 code is
// no faster on it (measured: same user time with and without -tags purego).
//
// Equality with x/crypto/argon2, RFC 9106's test vectors and
// cryptsetup-made keyslots is what the tests check.
package argon2

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"sync"

	"github.com/unlockrd/unlockrd/unlock/secret"
	"golang.org/x/crypto/blake2b"
)

// Mode is the Argon2 variant.
type Mode uint32

// The variants, numbered as RFC 9106 numbers them (the number is hashed).
const (
	D  Mode = 0
	I  Mode = 1
	ID Mode = 2
)

func (m Mode) String() string {
	switch m {
	case D:
		return "argon2d"
	case I:
		return "argon2i"
	case ID:
		return "argon2id"
	}
	return fmt.Sprintf("argon2 mode %d", uint32(m))
}

// Params are an Argon2 computation's costs and output length.
type Params struct {
	Mode      Mode
	Time      uint32 // passes over the memory, ≥ 1
	MemoryKiB uint32 // memory in KiB (1 KiB blocks), ≥ 8 per lane
	Lanes     uint8  // parallelism, ≥ 1; lanes run in parallel
	KeyLen    uint32 // output bytes, ≥ 4
}

const (
	version    = 0x13
	syncPoints = 4   // slices per pass
	addrPerBlk = 128 // reference indices one address block gives
	// checkEvery is how many blocks a lane computes between looks at
	// ctx: about a millisecond natively, well under a second under TCG.
	checkEvery = 1024
)

// Key derives p.KeyLen bytes from pass and salt. The caller owns and wipes
// the result. It returns ctx's error (wrapped) soon after ctx ends; the
// memory is wiped and unmapped before Key returns in every case.
func Key(ctx context.Context, p Params, pass, salt []byte) (*secret.Buf, error) {
	return derive(ctx, p, pass, salt, nil, nil, nil)
}

func (p Params) check() error {
	switch {
	case p.Mode > ID:
		return fmt.Errorf("unknown %v", p.Mode)
	case p.Time < 1:
		return errors.New("time cost 0")
	case p.Lanes < 1:
		return errors.New("0 lanes")
	case p.MemoryKiB < 8*uint32(p.Lanes):
		return fmt.Errorf("%d KiB of memory for %d lanes (at least 8 KiB a lane)", p.MemoryKiB, p.Lanes)
	case p.KeyLen < 4:
		return fmt.Errorf("%d-byte output", p.KeyLen)
	}
	return nil
}

// derive is Key with RFC 9106's optional secret and associated data (the
// test vectors use them; LUKS2 does not) and, for tests, a look at the
// memory once it is wiped.
func derive(ctx context.Context, p Params, pass, salt, key, ad []byte, wiped func([]block)) (*secret.Buf, error) {
	if err := p.check(); err != nil {
		return nil, fmt.Errorf("%v: %w", p.Mode, err)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	lanes := uint32(p.Lanes)
	segLen := p.MemoryKiB / (syncPoints * lanes)
	laneLen := segLen * syncPoints
	m, err := mapBlocks(int(laneLen * lanes))
	if err != nil {
		return nil, fmt.Errorf("%v needs %d MiB of memory: %w", p.Mode, p.MemoryKiB>>10, err)
	}
	defer m.unmap()
	mem := m.blocks
	defer func() {
		wipeLanes(mem, int(laneLen), int(lanes))
		if wiped != nil {
			wiped(mem)
		}
	}()

	h0 := initialHash(p, pass, salt, key, ad)
	defer clear(h0[:])
	initLanes(mem, h0, laneLen, lanes)

	in := instance{mem: mem, p: p, lanes: lanes, segLen: segLen, laneLen: laneLen}
	for round := uint32(0); round < p.Time; round++ {
		for slice := uint32(0); slice < syncPoints; slice++ {
			var wg sync.WaitGroup
			for lane := uint32(0); lane < lanes; lane++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					in.segment(ctx, round, slice, lane)
				}()
			}
			wg.Wait()
			if err := ctx.Err(); err != nil {
				return nil, fmt.Errorf("%v stopped in pass %d of %d: %w", p.Mode, round+1, p.Time, err)
			}
		}
	}

	var final block
	defer clear(final[:])
	final = mem[laneLen-1]
	for lane := uint32(1); lane < lanes; lane++ {
		b := &mem[lane*laneLen+laneLen-1]
		for i := range final {
			final[i] ^= b[i]
		}
	}
	var fb [1024]byte
	defer clear(fb[:])
	putBlock(fb[:], &final)
	out := secret.New(int(p.KeyLen))
	hashLong(out.Bytes(), fb[:])
	return out, nil
}

// instance is one computation's fixed geometry and memory.
type instance struct {
	mem             []block
	p               Params
	lanes           uint32
	segLen, laneLen uint32
}

// segment computes one lane's blocks of one slice (RFC 9106 §3.4). It
// returns early when ctx ends; the caller then discards the memory.
func (in *instance) segment(ctx context.Context, pass, slice, lane uint32) {
	independent := in.p.Mode == I || (in.p.Mode == ID && pass == 0 && slice < syncPoints/2)
	var input, addr, zero block
	defer clear(addr[:])
	if independent {
		input[0], input[1], input[2] = uint64(pass), uint64(lane), uint64(slice)
		input[3], input[4], input[5] = uint64(in.laneLen*in.lanes), uint64(in.p.Time), uint64(in.p.Mode)
	}
	next := func() {
		input[6]++
		compress(&addr, &zero, &input, false)
		compress(&addr, &zero, &addr, false)
	}
	start := uint32(0)
	if pass == 0 && slice == 0 {
		start = 2 // the first two blocks of each lane come from H0
		if independent {
			next()
		}
	}
	base := lane * in.laneLen
	for i := start; i < in.segLen; i++ {
		if (i-start)%checkEvery == checkEvery-1 && ctx.Err() != nil {
			return
		}
		cur := slice*in.segLen + i // index within the lane
		prev := cur - 1
		if cur == 0 {
			prev = in.laneLen - 1
		}
		var rnd uint64
		if independent {
			if i%addrPerBlk == 0 {
				next()
			}
			rnd = addr[i%addrPerBlk]
		} else {
			rnd = in.mem[base+prev][0]
		}
		refLane := uint32(rnd>>32) % in.lanes
		if pass == 0 && slice == 0 {
			refLane = lane
		}
		ref := in.refIndex(pass, slice, i, uint32(rnd), refLane == lane)
		compress(&in.mem[base+cur], &in.mem[base+prev], &in.mem[refLane*in.laneLen+ref], pass > 0)
	}
}

// refIndex maps J1 to the referenced block's index within its lane
// (RFC 9106 §3.4.1.2): a quadratic bias towards recent blocks over the
// blocks that are finished and not in the current slice of another lane.
func (in *instance) refIndex(pass, slice, i, j1 uint32, sameLane bool) uint32 {
	var area uint32
	switch {
	case pass == 0 && slice == 0:
		area = i - 1
	case pass == 0 && sameLane:
		area = slice*in.segLen + i - 1
	case pass == 0:
		area = slice * in.segLen
		if i == 0 {
			area--
		}
	case sameLane:
		area = in.laneLen - in.segLen + i - 1
	default:
		area = in.laneLen - in.segLen
		if i == 0 {
			area--
		}
	}
	x := uint64(j1) * uint64(j1) >> 32
	rel := uint64(area) - 1 - (uint64(area) * x >> 32)
	startPos := uint64(0)
	if pass != 0 && slice != syncPoints-1 {
		startPos = uint64(slice+1) * uint64(in.segLen)
	}
	return uint32((startPos + rel) % uint64(in.laneLen))
}

// initialHash is H0 (RFC 9106 §3.2).
func initialHash(p Params, pass, salt, key, ad []byte) [blake2b.Size + 8]byte {
	h, _ := blake2b.New512(nil)
	defer secret.ScrubHash(h)
	var w [4]byte
	le := func(v uint32) {
		binary.LittleEndian.PutUint32(w[:], v)
		h.Write(w[:])
	}
	le(uint32(p.Lanes))
	le(p.KeyLen)
	le(p.MemoryKiB)
	le(p.Time)
	le(version)
	le(uint32(p.Mode))
	for _, b := range [][]byte{pass, salt, key, ad} {
		le(uint32(len(b)))
		h.Write(b)
	}
	// 8 spare bytes for the block and lane numbers of initLanes.
	var out [blake2b.Size + 8]byte
	h.Sum(out[:0])
	return out
}

// initLanes fills the first two blocks of every lane:
// H'(H0 || LE32(block) || LE32(lane)).
func initLanes(mem []block, h0 [blake2b.Size + 8]byte, laneLen, lanes uint32) {
	var buf [1024]byte
	defer clear(buf[:])
	defer clear(h0[:])
	for lane := uint32(0); lane < lanes; lane++ {
		for j := uint32(0); j < 2; j++ {
			binary.LittleEndian.PutUint32(h0[blake2b.Size:], j)
			binary.LittleEndian.PutUint32(h0[blake2b.Size+4:], lane)
			hashLong(buf[:], h0[:])
			b := &mem[lane*laneLen+j]
			for i := range b {
				b[i] = binary.LittleEndian.Uint64(buf[8*i:])
			}
		}
	}
}

// hashLong is H' (RFC 9106 §3.3): out gets len(out) bytes of BLAKE2b,
// chained in 32-byte steps when more than 64 are asked for.
func hashLong(out, in []byte) {
	var n [4]byte
	binary.LittleEndian.PutUint32(n[:], uint32(len(out)))
	var v [blake2b.Size]byte
	defer clear(v[:])
	h := newHash(min(len(out), blake2b.Size))
	h.Write(n[:])
	h.Write(in)
	h.Sum(v[:0])
	secret.ScrubHash(h)
	for len(out) > blake2b.Size {
		copy(out, v[:32])
		out = out[32:]
		// V_{i+1} is 64 bytes while more than 64 remain; the last one
		// is exactly as long as what is left.
		h := newHash(min(len(out), blake2b.Size))
		h.Write(v[:])
		h.Sum(v[:0])
		secret.ScrubHash(h)
	}
	copy(out, v[:len(out)])
}

func newHash(size int) hash.Hash {
	h, err := blake2b.New(size, nil)
	if err != nil {
		panic(err) // size is 1..64 by construction
	}
	return h
}

func putBlock(dst []byte, b *block) {
	for i, w := range b {
		binary.LittleEndian.PutUint64(dst[8*i:], w)
	}
}

// wipeLanes zeroes the memory, one goroutine a lane: a gigabyte wiped by
// one core costs PID 1 a tenth of a second.
func wipeLanes(mem []block, laneLen, lanes int) {
	var wg sync.WaitGroup
	for l := 0; l < lanes; l++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			clear(mem[l*laneLen : (l+1)*laneLen])
		}()
	}
	wg.Wait()
}
