package kmod

import (
	"errors"
	"slices"
)

// prefixDecoder decodes the start of an .xz file whose blocks are plain
// LZMA2 (one block, or several when xz compressed it with threads) into a
// flat buffer, a step at a time, so that the alias scan can stop as soon
// as it has seen a module's .modinfo records.
//
// It exists because the alias scan of a tree without modules.alias is most
// of a first build for Debian 13's kernel, and nearly all of that scan is
// LZMA decoding: github.com/ulikunitz/xz (which reads whole modules here)
// decodes each bit through an io.ByteReader and a ring buffer, about
// 10 MB/s on this machine. This one works on the compressed file in memory
// and writes into the output slice itself (the whole prefix is the
// dictionary: nothing is decoded past the point the scan stops), which is
// several times faster. It never checks the block's CRC (a decoder stopped
// early never reaches it): what it finds only steers the scan, and every
// alias provider is confirmed from a full, checked read (Tree.confirm).
// TestPrefixDecoderMatchesXZ holds it to ulikunitz/xz on every module.
type prefixDecoder struct {
	in []byte // the .xz file
	ip int    // next input byte
	// padded is in followed by lzmaPad zero bytes: bit reads its input
	// from it without a bounds branch of its own, small enough for the
	// compiler to inline it (the bit decoder is most of the scan's CPU).
	// decodeLZMA checks before each symbol that the input did not run
	// out, and no symbol reads lzmaPad bytes.
	padded []byte
	// blockStart is where the current block's header starts; check is the
	// size of each block's check field.
	blockStart, check int
	out               []byte // decoded so far
	// base is the output position of the last dictionary reset.
	base int

	// Current chunk.
	unpacked int  // bytes of the current chunk still to produce
	lzmaMode bool // chunk is LZMA (not stored)
	chunkEnd int  // input offset of the next chunk header (LZMA chunks)
	done     bool

	// Range decoder.
	rng, code uint32

	// LZMA state.
	lc, lp, pb  uint
	state       int
	rep         [4]int
	propsSet    bool
	literal     []uint16
	isMatch     [12 << 4]uint16
	isRep       [12]uint16
	isRepG0     [12]uint16
	isRepG1     [12]uint16
	isRepG2     [12]uint16
	isRep0Long  [12 << 4]uint16
	posSlot     [4][64]uint16
	posDecoders [115]uint16
	align       [16]uint16
	matchLen    lenCoder
	repLen      lenCoder
}

type lenCoder struct {
	choice, choice2 uint16
	low, mid        [16][8]uint16
	high            [256]uint16
}

const probInit = 1 << 10

var errLZMA = errors.New("corrupt LZMA2 data")

// init makes d a decoder of the .xz file in, keeping the memory of its
// output and literal probabilities from the file it decoded before; false
// when in is not such a file.
func (d *prefixDecoder) init(in []byte) bool {
	if len(in) < 12 || string(in[:6]) != "\xfd7zXZ\x00" || in[6] != 0 {
		return false
	}
	check := xzCheckSize(in[7])
	start := xzBlockStart(in, 12)
	if start < 0 || check < 0 {
		return false
	}
	padded := in[:len(in):len(in)]
	if cap(in)-len(in) >= lzmaPad {
		padded = in[:len(in)+lzmaPad]
		clear(padded[len(in):])
	} else {
		padded = append(padded, make([]byte, lzmaPad)...)
	}
	*d = prefixDecoder{in: in, padded: padded, ip: start, blockStart: 12, check: check,
		out: d.out[:0], literal: d.literal[:0]}
	return true
}

// lzmaPad bounds the input one LZMA symbol reads (at most one byte per
// bit decoded: fewer than 64), with room to spare.
const lzmaPad = 128

// endBlock moves past the end of an LZMA2 block (padding, check) to the
// next block's data, or sets done at the index.
func (d *prefixDecoder) endBlock() error {
	for (d.ip-d.blockStart)%4 != 0 {
		d.ip++
	}
	d.ip += d.check
	if d.ip >= len(d.in) {
		return errLZMA
	}
	if d.in[d.ip] == 0 { // the index: no more blocks
		d.done = true
		return nil
	}
	start := xzBlockStart(d.in, d.ip)
	if start < 0 {
		return errLZMA
	}
	// Each block starts with a dictionary reset: its first chunk says so.
	d.blockStart, d.ip, d.propsSet = d.ip, start, false
	return nil
}

func resetProbs(p []uint16) {
	for i := range p {
		p[i] = probInit
	}
}

func (l *lenCoder) reset() {
	l.choice, l.choice2 = probInit, probInit
	for i := range l.low {
		resetProbs(l.low[i][:])
		resetProbs(l.mid[i][:])
	}
	resetProbs(l.high[:])
}

func (d *prefixDecoder) resetState() {
	d.state = 0
	d.rep = [4]int{}
	n := 0x300 << (d.lc + d.lp)
	if cap(d.literal) < n {
		d.literal = make([]uint16, n)
	}
	d.literal = d.literal[:n]
	resetProbs(d.literal)
	resetProbs(d.isMatch[:])
	resetProbs(d.isRep[:])
	resetProbs(d.isRepG0[:])
	resetProbs(d.isRepG1[:])
	resetProbs(d.isRepG2[:])
	resetProbs(d.isRep0Long[:])
	for i := range d.posSlot {
		resetProbs(d.posSlot[i][:])
	}
	resetProbs(d.posDecoders[:])
	resetProbs(d.align[:])
	d.matchLen.reset()
	d.repLen.reset()
}

// fill decodes until at least want bytes are out, the stream ends (done)
// or the data is bad.
func (d *prefixDecoder) fill(want int) error {
	for len(d.out) < want && !d.done {
		if d.unpacked == 0 {
			if err := d.chunkHeader(); err != nil {
				return err
			}
			continue
		}
		if !d.lzmaMode {
			n := min(d.unpacked, len(d.in)-d.ip, want-len(d.out))
			if n <= 0 {
				return errLZMA
			}
			d.out = append(d.out, d.in[d.ip:d.ip+n]...)
			d.ip += n
			d.unpacked -= n
			continue
		}
		if err := d.decodeLZMA(want); err != nil {
			return err
		}
	}
	return nil
}

func (d *prefixDecoder) chunkHeader() error {
	if d.ip >= len(d.in) {
		return errLZMA
	}
	c := d.in[d.ip]
	d.ip++
	switch {
	case c == 0:
		return d.endBlock()
	case c == 1 || c == 2:
		if d.ip+2 > len(d.in) {
			return errLZMA
		}
		if c == 1 {
			d.base = len(d.out)
		}
		d.unpacked = int(d.in[d.ip])<<8 | int(d.in[d.ip+1]) + 1
		d.ip += 2
		d.lzmaMode = false
		return nil
	case c < 0x80:
		return errLZMA
	}
	if d.ip+4 > len(d.in) {
		return errLZMA
	}
	d.unpacked = (int(c&0x1f)<<16 | int(d.in[d.ip])<<8 | int(d.in[d.ip+1])) + 1
	packed := int(d.in[d.ip+2])<<8 | int(d.in[d.ip+3]) + 1
	d.ip += 4
	reset := (c >> 5) & 3
	if reset == 3 {
		d.base = len(d.out)
	}
	if reset >= 2 {
		if d.ip >= len(d.in) {
			return errLZMA
		}
		p := int(d.in[d.ip])
		d.ip++
		if p >= 9*5*5 {
			return errLZMA
		}
		d.lc, d.lp, d.pb = uint(p%9), uint(p/9%5), uint(p/45)
		if d.lc+d.lp > 4 {
			return errLZMA
		}
		d.propsSet = true
	}
	if !d.propsSet {
		return errLZMA
	}
	if reset >= 1 {
		d.resetState()
	}
	// A new range decoder for every LZMA chunk. The bits are normalized
	// before use rather than after, so the decoder may stop short of the
	// chunk's last byte: the next chunk starts where the header says.
	if d.ip+5 > len(d.in) || d.in[d.ip] != 0 || packed < 5 {
		return errLZMA
	}
	d.chunkEnd = d.ip + packed
	d.code = uint32(d.in[d.ip+1])<<24 | uint32(d.in[d.ip+2])<<16 | uint32(d.in[d.ip+3])<<8 | uint32(d.in[d.ip+4])
	d.rng = 0xffffffff
	d.ip += 5
	d.lzmaMode = true
	return nil
}

// bit decodes one bit with probability *p: rangeBit's step on d's fields,
// written out because calling rangeBit would put bit over the inliner's
// budget (measured: 6 % more CPU for the scan).
func (d *prefixDecoder) bit(p *uint16) uint32 {
	if d.rng < 1<<24 {
		d.rng <<= 8
		d.code = d.code<<8 | uint32(d.padded[d.ip])
		d.ip++
	}
	bound := (d.rng >> 11) * uint32(*p)
	if d.code < bound {
		d.rng = bound
		*p += (1<<11 - *p) >> 5
		return 0
	}
	d.rng -= bound
	d.code -= bound
	*p -= *p >> 5
	return 1
}

// rangeBit is the range decoder's step for one bit of probability *p, on
// values rather than d's fields: the literal loops keep rng, code and ip
// in locals (most of the scan's bits are literal bits, and through d the
// compiler must store them at every bit, since the probabilities it writes
// live in d too). It is small enough to be inlined; in is the padded
// input (no bounds branch of its own).
func rangeBit(rng, code uint32, ip int, in []byte, p *uint16) (uint32, uint32, int, uint32) {
	if rng < 1<<24 {
		rng <<= 8
		code = code<<8 | uint32(in[ip])
		ip++
	}
	v := uint32(*p)
	bound := (rng >> 11) * v
	if code < bound {
		*p = uint16(v + (1<<11-v)>>5)
		return bound, code, ip, 0
	}
	*p = uint16(v - v>>5)
	return rng - bound, code - bound, ip, 1
}

func (d *prefixDecoder) normalize() {
	d.rng <<= 8
	d.code = d.code<<8 | uint32(d.nextByte())
}

// nextByte is the next input byte; past the end it gives 0s, and the
// caller's bounds checks on the output catch the garbage that follows.
func (d *prefixDecoder) nextByte() byte {
	if d.ip < len(d.in) {
		b := d.in[d.ip]
		d.ip++
		return b
	}
	d.ip++
	return 0
}

func (d *prefixDecoder) tree(probs []uint16, bits int) int {
	m := 1
	for i := 0; i < bits; i++ {
		m = m<<1 | int(d.bit(&probs[m]))
	}
	return m - 1<<bits
}

func (d *prefixDecoder) reverseTree(probs []uint16, bits int) int {
	m, sym := 1, 0
	for i := 0; i < bits; i++ {
		b := int(d.bit(&probs[m]))
		m = m<<1 | b
		sym |= b << i
	}
	return sym
}

func (d *prefixDecoder) direct(bits int) int {
	v := 0
	for i := 0; i < bits; i++ {
		if d.rng < 1<<24 {
			d.normalize()
		}
		d.rng >>= 1
		b := 0
		if d.code >= d.rng {
			d.code -= d.rng
			b = 1
		}
		v = v<<1 | b
	}
	return v
}

func (d *prefixDecoder) length(l *lenCoder, posState int) int {
	if d.bit(&l.choice) == 0 {
		return d.tree(l.low[posState][:], 3)
	}
	if d.bit(&l.choice2) == 0 {
		return 8 + d.tree(l.mid[posState][:], 3)
	}
	return 16 + d.tree(l.high[:], 8)
}

// decodeLZMA decodes symbols of the current chunk until want bytes are out
// or the chunk is complete.
func (d *prefixDecoder) decodeLZMA(want int) error {
	pbMask := 1<<d.pb - 1
	lpMask := 1<<d.lp - 1
	end := len(d.out) + d.unpacked
	for len(d.out) < want && len(d.out) < end {
		if d.ip > len(d.in) {
			return errLZMA
		}
		pos := len(d.out) - d.base
		posState := pos & pbMask
		st := d.state
		if d.bit(&d.isMatch[st<<4|posState]) == 0 {
			prev := 0
			if pos > 0 {
				prev = int(d.out[len(d.out)-1])
			}
			probs := d.literal[0x300*((pos&lpMask)<<d.lc+prev>>(8-d.lc)):]
			// The literal's bits, with the range decoder in locals
			// (rangeBit).
			rng, code, ip, in := d.rng, d.code, d.ip, d.padded
			var b uint32
			sym := 1
			if st >= 7 {
				if d.rep[0] >= pos {
					return errLZMA
				}
				match := int(d.out[len(d.out)-d.rep[0]-1])
				for sym < 0x100 {
					mb := uint32(match>>7) & 1
					match <<= 1
					rng, code, ip, b = rangeBit(rng, code, ip, in, &probs[0x100+int(mb)<<8+sym])
					sym = sym<<1 | int(b)
					if b != mb {
						break
					}
				}
			}
			for sym < 0x100 {
				rng, code, ip, b = rangeBit(rng, code, ip, in, &probs[sym])
				sym = sym<<1 | int(b)
			}
			d.rng, d.code, d.ip = rng, code, ip
			d.out = append(d.out, byte(sym))
			switch {
			case st < 4:
				d.state = 0
			case st < 10:
				d.state = st - 3
			default:
				d.state = st - 6
			}
			continue
		}
		var n int
		if d.bit(&d.isRep[st]) == 0 {
			n = d.length(&d.matchLen, posState)
			if st < 7 {
				d.state = 7
			} else {
				d.state = 10
			}
			lenState := min(n, 3)
			slot := d.tree(d.posSlot[lenState][:], 6)
			dist := slot
			if slot >= 4 {
				bits := slot>>1 - 1
				dist = (2 | slot&1) << bits
				if slot < 14 {
					dist += d.reverseTree(d.posDecoders[dist-slot:], bits)
				} else {
					dist += d.direct(bits-4) << 4
					dist += d.reverseTree(d.align[:], 4)
				}
			}
			if dist == 0xffffffff {
				d.done = true // end marker (xz does not write one in LZMA2)
				return nil
			}
			d.rep[3], d.rep[2], d.rep[1], d.rep[0] = d.rep[2], d.rep[1], d.rep[0], dist
		} else {
			if d.bit(&d.isRepG0[st]) == 0 {
				if d.bit(&d.isRep0Long[st<<4|posState]) == 0 {
					// Short rep: one byte at rep0.
					if d.rep[0] >= pos {
						return errLZMA
					}
					d.out = append(d.out, d.out[len(d.out)-d.rep[0]-1])
					if st < 7 {
						d.state = 9
					} else {
						d.state = 11
					}
					continue
				}
			} else {
				var dist int
				if d.bit(&d.isRepG1[st]) == 0 {
					dist = d.rep[1]
				} else {
					if d.bit(&d.isRepG2[st]) == 0 {
						dist = d.rep[2]
					} else {
						dist = d.rep[3]
						d.rep[3] = d.rep[2]
					}
					d.rep[2] = d.rep[1]
				}
				d.rep[1] = d.rep[0]
				d.rep[0] = dist
			}
			n = d.length(&d.repLen, posState)
			if st < 7 {
				d.state = 8
			} else {
				d.state = 11
			}
		}
		n += 2
		if d.rep[0] >= pos || len(d.out)+n > end {
			return errLZMA
		}
		o := slices.Grow(d.out, n)[:len(d.out)+n]
		for i, dist := len(d.out), d.rep[0]+1; i < len(o); i++ {
			o[i] = o[i-dist] // byte by byte: the copy may overlap itself
		}
		d.out = o
	}
	d.unpacked = end - len(d.out)
	if d.unpacked == 0 {
		if d.ip > d.chunkEnd {
			return errLZMA
		}
		d.ip = d.chunkEnd
	}
	return nil
}
