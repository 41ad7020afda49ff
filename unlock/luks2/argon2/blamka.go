package argon2

import "math/bits"

// block is one Argon2 memory block: 1 KiB as 128 little-endian words.
type block [128]uint64

// compress is Argon2's compression function G (RFC 9106 §3.5): R = x^y,
// Z = P applied to R's rows, then to its columns, and out = Z^R — or,
// with xor (every pass after the first), out ^= Z^R. out may be x or y's
// neighbour but never x or y itself.
//
// The first pass writes out without reading it, so a fresh page of the
// memory takes one (write) fault instead of a read fault on the zero page
// followed by a copy-on-write.
func compress(out, x, y *block, xor bool) {
	var r, z block
	for i := range r {
		r[i] = x[i] ^ y[i]
	}
	z = r
	for i := 0; i < 8; i++ {
		permute((*[16]uint64)(z[16*i : 16*i+16]))
	}
	for i := 0; i < 8; i++ {
		var c [16]uint64
		for k := 0; k < 8; k++ {
			c[2*k], c[2*k+1] = z[2*i+16*k], z[2*i+16*k+1]
		}
		permute(&c)
		for k := 0; k < 8; k++ {
			z[2*i+16*k], z[2*i+16*k+1] = c[2*k], c[2*k+1]
		}
	}
	if xor {
		for i := range out {
			out[i] ^= z[i] ^ r[i]
		}
	} else {
		for i := range out {
			out[i] = z[i] ^ r[i]
		}
	}
}

// permute is P (RFC 9106 §3.6): BLAKE2b's round without message words,
// with the additions replaced by BlaMka's multiply-add, on 16 words held
// in locals so that the compiler keeps them in registers.
func permute(v *[16]uint64) {
	v0, v1, v2, v3, v4, v5, v6, v7 := v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]
	v8, v9, v10, v11, v12, v13, v14, v15 := v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]
	v0, v4, v8, v12 = gb(v0, v4, v8, v12)
	v1, v5, v9, v13 = gb(v1, v5, v9, v13)
	v2, v6, v10, v14 = gb(v2, v6, v10, v14)
	v3, v7, v11, v15 = gb(v3, v7, v11, v15)
	v0, v5, v10, v15 = gb(v0, v5, v10, v15)
	v1, v6, v11, v12 = gb(v1, v6, v11, v12)
	v2, v7, v8, v13 = gb(v2, v7, v8, v13)
	v3, v4, v9, v14 = gb(v3, v4, v9, v14)
	v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7] = v0, v1, v2, v3, v4, v5, v6, v7
	v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15] = v8, v9, v10, v11, v12, v13, v14, v15
}

// gb is GB (RFC 9106 §3.6).
func gb(a, b, c, d uint64) (uint64, uint64, uint64, uint64) {
	a = a + b + 2*uint64(uint32(a))*uint64(uint32(b))
	d = bits.RotateLeft64(d^a, -32)
	c = c + d + 2*uint64(uint32(c))*uint64(uint32(d))
	b = bits.RotateLeft64(b^c, -24)
	a = a + b + 2*uint64(uint32(a))*uint64(uint32(b))
	d = bits.RotateLeft64(d^a, -16)
	c = c + d + 2*uint64(uint32(c))*uint64(uint32(d))
	b = bits.RotateLeft64(b^c, -63)
	return a, b, c, d
}
