package argon2

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	xargon2 "golang.org/x/crypto/argon2"
)

// TestRFC9106Vectors checks the three test vectors of RFC 9106 §5, which
// use the secret and associated-data inputs LUKS2 leaves empty.
func TestRFC9106Vectors(t *testing.T) {
	pass := bytes.Repeat([]byte{1}, 32)
	salt := bytes.Repeat([]byte{2}, 16)
	key := bytes.Repeat([]byte{3}, 8)
	ad := bytes.Repeat([]byte{4}, 12)
	for _, tc := range []struct {
		mode Mode
		tag  string
	}{
		{D, "512b391b6f1162975371d30919734294f868e3be3984f3c1a13a4db9fabe4acb"},
		{I, "c814d9d1dc7f37aa13f0d77f2494bda1c8de6b016dd388d29952a4c4672b6ce8"},
		{ID, "0d640df58d78766c08c037a34a8b53c9d01ef0452d75b65eb52520e96b01e659"},
	} {
		got, err := derive(context.Background(), Params{Mode: tc.mode, Time: 3, MemoryKiB: 32, Lanes: 4, KeyLen: 32}, pass, salt, key, ad, nil)
		if err != nil {
			t.Fatalf("%v: %v", tc.mode, err)
		}
		if h := hex.EncodeToString(got.Bytes()); h != tc.tag {
			t.Errorf("%v: tag %s, RFC 9106 says %s", tc.mode, h, tc.tag)
		}
		got.Wipe()
	}
}

// checkXCrypto compares Key with x/crypto/argon2 on one set of inputs.
func checkXCrypto(t *testing.T, p Params, pass, salt []byte) {
	t.Helper()
	var want []byte
	if p.Mode == I {
		want = xargon2.Key(pass, salt, p.Time, p.MemoryKiB, p.Lanes, p.KeyLen)
	} else {
		want = xargon2.IDKey(pass, salt, p.Time, p.MemoryKiB, p.Lanes, p.KeyLen)
	}
	got, err := Key(context.Background(), p, pass, salt)
	if err != nil {
		t.Fatalf("%+v: %v", p, err)
	}
	defer got.Wipe()
	if !bytes.Equal(got.Bytes(), want) {
		t.Fatalf("%+v pass %x salt %x:\n got %x\nwant %x (x/crypto)", p, pass, salt, got.Bytes(), want)
	}
}

// TestEqualsXCrypto compares with x/crypto/argon2 on random parameters:
// odd lane counts, memory that is not a multiple of 4×lanes (rounded
// down), outputs shorter and longer than one BLAKE2b digest, and one
// LUKS-sized run with several address blocks per segment.
func TestEqualsXCrypto(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, uint64(time.Now().UnixNano())))
	n := 60
	if testing.Short() {
		n = 15
	}
	for i := 0; i < n; i++ {
		lanes := uint8(1 + rng.IntN(8))
		p := Params{
			Mode:      Mode(1 + rng.IntN(2)),
			Time:      uint32(1 + rng.IntN(4)),
			MemoryKiB: uint32(8*int(lanes) + rng.IntN(3000)),
			Lanes:     lanes,
			KeyLen:    uint32(4 + rng.IntN(200)),
		}
		pass := make([]byte, rng.IntN(80))
		salt := make([]byte, rng.IntN(40))
		for _, b := range [][]byte{pass, salt} {
			for j := range b {
				b[j] = byte(rng.Uint32())
			}
		}
		checkXCrypto(t, p, pass, salt)
	}
	checkXCrypto(t, Params{Mode: ID, Time: 2, MemoryKiB: 64 << 10, Lanes: 4, KeyLen: 64}, []byte("luks passphrase"), bytes.Repeat([]byte{7}, 32))
}

// FuzzEqualsXCrypto is TestEqualsXCrypto driven by the fuzzer.
func FuzzEqualsXCrypto(f *testing.F) {
	f.Add(uint8(2), uint8(3), uint16(100), uint8(2), uint8(32), []byte("pass"), []byte("saltsalt"))
	f.Fuzz(func(t *testing.T, mode, tm uint8, mem uint16, lanes, keyLen uint8, pass, salt []byte) {
		p := Params{Mode: Mode(1 + mode%2), Time: uint32(1 + tm%4), Lanes: 1 + lanes%8, KeyLen: 4 + uint32(keyLen)}
		p.MemoryKiB = 8*uint32(p.Lanes) + uint32(mem%4096)
		checkXCrypto(t, p, pass, salt)
	})
}

// TestMemoryWiped checks that every block of the memory is zero once Key
// is done with it, on a run that completes and on one that is cancelled.
func TestMemoryWiped(t *testing.T) {
	p := Params{Mode: ID, Time: 2, MemoryKiB: 4096, Lanes: 2, KeyLen: 64}
	check := func(name string, ctx context.Context) {
		seen := false
		_, _ = derive(ctx, p, []byte("secret"), []byte("saltsaltsaltsalt"), nil, nil, func(mem []block) {
			seen = true
			for i := range mem {
				if mem[i] != (block{}) {
					t.Fatalf("%s: block %d of %d not wiped", name, i, len(mem))
				}
			}
		})
		if !seen {
			t.Fatalf("%s: the memory was never looked at", name)
		}
	}
	check("complete", context.Background())
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := derive(ctx, p, nil, []byte("saltsaltsaltsalt"), nil, nil, nil)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled before start: %v", err)
	}
	ctx, cancel = context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	big := p
	big.MemoryKiB, big.Time = 256<<10, 8
	_, err = derive(ctx, big, []byte("secret"), []byte("saltsaltsaltsalt"), nil, nil, func(mem []block) {
		for i := range mem {
			if mem[i] != (block{}) {
				t.Fatalf("cancelled: block %d of %d not wiped", i, len(mem))
			}
		}
	})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("cancelled run: %v, want the deadline", err)
	}
}

// TestCancelPrompt checks that a deadline stops a large computation well
// before it would finish.
func TestCancelPrompt(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := Key(ctx, Params{Mode: ID, Time: 50, MemoryKiB: 128 << 10, Lanes: 2, KeyLen: 32}, []byte("p"), []byte("saltsaltsaltsalt"))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err %v, want the deadline", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("took %v to stop after a 50 ms deadline", d)
	}
}

// TestBadParams checks that impossible parameters are refused by name.
func TestBadParams(t *testing.T) {
	for _, p := range []Params{
		{Mode: ID, Time: 0, MemoryKiB: 64, Lanes: 1, KeyLen: 32},
		{Mode: ID, Time: 1, MemoryKiB: 64, Lanes: 0, KeyLen: 32},
		{Mode: ID, Time: 1, MemoryKiB: 15, Lanes: 2, KeyLen: 32},
		{Mode: ID, Time: 1, MemoryKiB: 64, Lanes: 1, KeyLen: 3},
		{Mode: 3, Time: 1, MemoryKiB: 64, Lanes: 1, KeyLen: 32},
	} {
		if k, err := Key(context.Background(), p, nil, nil); err == nil {
			k.Wipe()
			t.Errorf("%+v accepted", p)
		}
	}
}

// BenchmarkKey and BenchmarkXCrypto compare the two on the same work:
// small memory (compression speed) and LUKS-sized memory (faults, TLB).
func BenchmarkKey(b *testing.B) {
	for _, mem := range []uint32{8 << 10, 256 << 10} {
		p := Params{Mode: ID, Time: 4, MemoryKiB: mem, Lanes: 2, KeyLen: 64}
		b.Run(fmt.Sprintf("%dMiB", mem>>10), func(b *testing.B) {
			for b.Loop() {
				k, err := Key(context.Background(), p, []byte("pass"), []byte("saltsaltsaltsalt"))
				if err != nil {
					b.Fatal(err)
				}
				k.Wipe()
			}
		})
	}
}

func BenchmarkXCrypto(b *testing.B) {
	for _, mem := range []uint32{8 << 10, 256 << 10} {
		b.Run(fmt.Sprintf("%dMiB", mem>>10), func(b *testing.B) {
			for b.Loop() {
				xargon2.IDKey([]byte("pass"), []byte("saltsaltsaltsalt"), 4, mem, 2, 64)
			}
		})
	}
}
