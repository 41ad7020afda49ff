package luks2

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"

	"github.com/unlockrd/unlockrd/unlock/luks2/luks2test"
)

// memDev is an in-memory Device of size bytes that records every write
// and sync, so a test can rebuild what a disk would hold after a power
// cut at any point, and can be told to fail a write or a sync. It keeps
// only b, the bytes up to the furthest write; the rest reads as zero.
type memDev struct {
	b     []byte
	size  int64
	ops   []op
	failW int // the failW-th write (1-based) returns an error; 0: none
	failS int // the failS-th sync returns an error
	nw    int
	ns    int
}

// op is a write (data at off) or, with data nil, a sync.
type op struct {
	off  int64
	data []byte
}

var errInjected = errors.New("injected I/O error")

func newMemDev(b []byte, size int64) *memDev { return &memDev{b: slices.Clone(b), size: size} }

// img is a device of size bytes whose first len(b) bytes are b, the rest
// zero.
type img struct {
	b    []byte
	size int64
}

func (m img) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > m.size {
		return 0, fmt.Errorf("read of %d at %d beyond %d", len(p), off, m.size)
	}
	clear(p)
	if off < int64(len(m.b)) {
		copy(p, m.b[off:])
	}
	return len(p), nil
}

func (d *memDev) ReadAt(p []byte, off int64) (int, error) { return img{d.b, d.size}.ReadAt(p, off) }

// put copies p to off in b, growing b as needed.
func put(b []byte, p []byte, off int64) []byte {
	if end := off + int64(len(p)); end > int64(len(b)) {
		b = append(b, make([]byte, end-int64(len(b)))...)
	}
	copy(b[off:], p)
	return b
}

func (d *memDev) WriteAt(p []byte, off int64) (int, error) {
	d.nw++
	if d.nw == d.failW {
		return 0, errInjected
	}
	if off < 0 || off+int64(len(p)) > d.size {
		return 0, fmt.Errorf("write at %d beyond %d", off, d.size)
	}
	d.b = put(d.b, p, off)
	d.ops = append(d.ops, op{off, slices.Clone(p)})
	return len(p), nil
}

func (d *memDev) Sync() error {
	d.ns++
	if d.ns == d.failS {
		return errInjected
	}
	d.ops = append(d.ops, op{})
	return nil
}

func (d *memDev) writes() int {
	n := 0
	for _, o := range d.ops {
		if o.data != nil {
			n++
		}
	}
	return n
}

// cut is one state a disk may be in after power fails while write k
// (0-based) of a recorded run is in flight.
type cut struct {
	name  string
	state []byte
}

// cuts replays ops over start and returns, for every write k, the states
// a power cut during or right after it can leave: writes before the last
// sync that preceded k are on the disk; of the writes since (k included)
// none, all, each one alone, or all but a torn last one (a prefix or a
// suffix of its 512-byte sectors; every cut point for writes of up to 64
// sectors, a sample for larger ones). Writes never synced are lost.
func cuts(start []byte, ops []op) []cut {
	var out []cut
	synced := slices.Clone(start)
	var pending []op
	apply := func(base []byte, ws []op) []byte {
		s := slices.Clone(base)
		for _, w := range ws {
			s = put(s, w.data, w.off)
		}
		return s
	}
	k := 0
	for _, o := range ops {
		if o.data == nil {
			synced = apply(synced, pending)
			pending = nil
			continue
		}
		pending = append(pending, o)
		name := func(f string, a ...any) string {
			return fmt.Sprintf("write %d (%d bytes at %d): ", k+1, len(o.data), o.off) + fmt.Sprintf(f, a...)
		}
		out = append(out, cut{name("nothing since the last sync"), slices.Clone(synced)})
		out = append(out, cut{name("all of it"), apply(synced, pending)})
		if len(pending) > 1 {
			for i, w := range pending {
				out = append(out, cut{name("only unsynced write %d of %d", i+1, len(pending)), apply(synced, []op{w})})
			}
		}
		before := apply(synced, pending[:len(pending)-1])
		sectors := (len(o.data) + 511) / 512
		var points []int
		if sectors <= 64 {
			for i := 1; i < sectors; i++ {
				points = append(points, i)
			}
		} else {
			points = []int{1, 2, sectors / 2, sectors - 1}
		}
		for _, p := range points {
			out = append(out, cut{name("torn: first %d of %d sectors", p, sectors), apply(before, []op{{o.off, o.data[:p*512]}})})
			out = append(out, cut{name("torn: last %d of %d sectors", sectors-p, sectors), apply(before, []op{{o.off + int64(p*512), o.data[p*512:]}})})
		}
		k++
	}
	return out
}

// seededRand is a deterministic random source, so a rerun of an operation
// writes the same bytes as the recorded run.
func seededRand(seed int64) *rand.Rand { return rand.New(rand.NewSource(seed)) }

// oracle runs cryptsetup on device images; it caches by content, since
// many cut states are equal.
type oracle struct {
	t    *testing.T
	dir  string
	seen map[[32]byte]map[string]bool
	runs int
}

func newOracle(t *testing.T) *oracle {
	luks2test.RequireCryptsetup(t)
	return &oracle{t: t, dir: t.TempDir(), seen: map[[32]byte]map[string]bool{}}
}

// opens reports whether cryptsetup takes img as LUKS (key "") and which of
// keys open it (open --test-passphrase).
func (o *oracle) opens(dev img, keys ...[]byte) map[string]bool {
	o.t.Helper()
	sum := sha256.Sum256(append(binary.BigEndian.AppendUint64(nil, uint64(dev.size)), bytes.TrimRight(dev.b, "\x00")...))
	if r, ok := o.seen[sum]; ok {
		return r
	}
	path := filepath.Join(o.dir, "state.img")
	writeSparse(o.t, path, dev)
	r := map[string]bool{}
	o.runs++
	r[""] = exec.Command("cryptsetup", "isLuks", path).Run() == nil
	for _, k := range keys {
		kf := filepath.Join(o.dir, "key")
		if err := os.WriteFile(kf, k, 0o600); err != nil {
			o.t.Fatal(err)
		}
		// A copy per key: cryptsetup repairs a damaged copy when it can.
		writeSparse(o.t, path, dev)
		o.runs++
		r[string(k)] = exec.Command("cryptsetup", "open", "--test-passphrase", "--key-file", kf, path).Run() == nil
	}
	o.seen[sum] = r
	return r
}

// writeSparse writes img to path as a sparse file: only its non-zero
// 64 KiB chunks are written (the test devices are mostly zero).
func writeSparse(t *testing.T, path string, dev img) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(dev.size); err != nil {
		t.Fatal(err)
	}
	const chunk = 64 << 10
	for off := 0; off < len(dev.b); off += chunk {
		c := dev.b[off:min(off+chunk, len(dev.b))]
		if !allZero(c) {
			if _, err := f.WriteAt(c, int64(off)); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func allZero(b []byte) bool { return len(bytes.TrimRight(b, "\x00")) == 0 }

func (d *memDev) img() img { return img{d.b, d.size} }
