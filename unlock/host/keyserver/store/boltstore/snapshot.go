package boltstore

import (
	"context"
	"encoding/binary"
	"hash/fnv"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	bolt "go.etcd.io/bbolt"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store"
)

// Reads are served from a snapshot of every record, taken in one read
// transaction and kept while the file's last committed transaction is the
// one it was taken at. Opening the file for each read (flock, mmap, page
// faults, munmap, close) cost more than all the rest of a key request but
// the TLS handshake; checking that nothing was committed since costs one
// stat and one pread of the two meta pages.
//
// bbolt commits by writing the data pages, syncing, then writing the meta
// page of the new transaction id (alternating between pages 0 and 1), and
// a reader uses the valid meta page with the highest id. We read those two
// pages the same way (magic, version, checksum) without taking the lock:
// a meta page caught half-written fails its checksum, so we see the
// previous commit, as a reader that came a moment earlier would. Anything
// unexpected (another page size, no valid meta page, a file replaced, a
// record that doesn't decode) means no snapshot, and the per-operation
// open as before, which also reports the error.

// snapshotMax bounds the records held in memory; a larger fleet is read
// per request.
const snapshotMax = 100_000

// snapshotWaitMax is the largest fleet whose requests wait for a reload
// in progress (a few ms of decoding) instead of opening the file.
const snapshotWaitMax = 20_000

type snapshot struct {
	dev, ino uint64
	txid     uint64
	hosts    map[string]store.Host
	masterID string
	tooBig   bool // more than snapshotMax records: don't use, don't retry
}

// metaReader reads meta pages through a descriptor kept open on the file
// (it takes no lock, so it doesn't get in bbolt's way), reopened when the
// path names another file.
type metaReader struct {
	mu       sync.Mutex
	f        *os.File
	dev, ino uint64
}

type snapState struct {
	snap   atomic.Pointer[snapshot]
	loadMu sync.Mutex
	meta   metaReader
}

var pageSize = os.Getpagesize()

var metaBufs = sync.Pool{New: func() any { b := make([]byte, pageSize+metaLen); return &b }}

const (
	pageHeaderLen = 16 // id u64, flags u16, count u16, overflow u32
	metaLen       = pageHeaderLen + 64
	boltMagic     = 0xED0CDAED
	boltVersion   = 2
)

// committed returns the file's identity and the id of its last committed
// transaction, or ok=false if they can't be read that way.
func (s *Store) committed() (dev, ino, txid uint64, ok bool) {
	var st syscall.Stat_t
	if err := syscall.Stat(s.path, &st); err != nil || st.Size < int64(2*pageSize) {
		return 0, 0, 0, false
	}
	f := s.snap.meta.file(s.path, uint64(st.Dev), st.Ino)
	if f == nil {
		return 0, 0, 0, false
	}
	bp := metaBufs.Get().(*[]byte)
	defer metaBufs.Put(bp)
	b := *bp
	if n, err := f.ReadAt(b, 0); err != nil || n != len(b) {
		return 0, 0, 0, false
	}
	t0, ok0 := parseMeta(b[:metaLen])
	t1, ok1 := parseMeta(b[pageSize : pageSize+metaLen])
	switch {
	case ok0 && ok1:
		txid = max(t0, t1)
	case ok0:
		txid = t0
	case ok1:
		txid = t1
	default:
		return 0, 0, 0, false
	}
	return uint64(st.Dev), st.Ino, txid, true
}

// parseMeta checks one meta page as bbolt does (common.Meta.Validate) and
// returns its transaction id. Fields are in the machine's byte order, as
// bbolt writes them.
func parseMeta(p []byte) (uint64, bool) {
	m := p[pageHeaderLen:]
	le := binary.NativeEndian
	if le.Uint32(m[0:]) != boltMagic || le.Uint32(m[4:]) != boltVersion || le.Uint32(m[8:]) != uint32(pageSize) {
		return 0, false
	}
	h := fnv.New64a()
	h.Write(m[:56])
	if h.Sum64() != le.Uint64(m[56:]) {
		return 0, false
	}
	return le.Uint64(m[48:]), true
}

func (r *metaReader) file(path string, dev, ino uint64) *os.File {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.f != nil && r.dev == dev && r.ino == ino {
		return r.f
	}
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil || uint64(st.Dev) != dev || st.Ino != ino {
		f.Close() // replaced again meanwhile: next time
		return nil
	}
	if r.f != nil {
		// A concurrent ReadAt on it fails and falls back to the slow path.
		r.f.Close()
	}
	r.f, r.dev, r.ino = f, dev, ino
	return f
}

func (r *metaReader) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.f != nil {
		r.f.Close()
		r.f = nil
	}
}

// current returns a snapshot of the last commit, loading one if needed,
// or nil: then the caller reads the file itself.
func (s *Store) current(ctx context.Context) *snapshot {
	dev, ino, txid, ok := s.committed()
	if !ok {
		return nil
	}
	if sn := s.snap.snap.Load(); sn != nil && sn.dev == dev && sn.ino == ino && sn.txid == txid {
		if sn.tooBig {
			return nil
		}
		return sn
	}
	// One loader at a time. Requests meanwhile wait for it when the fleet
	// is small enough to load quickly: opening the file per request while
	// a storm of them arrives (after every last-seen flush) costs far more
	// memory than the short wait. A large fleet's requests read the file
	// themselves rather than queue behind a long load.
	if !s.snap.loadMu.TryLock() {
		if prev := s.snap.snap.Load(); prev == nil || len(prev.hosts) > snapshotWaitMax {
			return nil
		}
		s.snap.loadMu.Lock()
		if sn := s.snap.snap.Load(); sn != nil && sn.dev == dev && sn.ino == ino && sn.txid >= txid && !sn.tooBig {
			s.snap.loadMu.Unlock()
			return sn
		}
	}
	defer s.snap.loadMu.Unlock()
	sn := &snapshot{dev: dev, ino: ino, hosts: map[string]store.Host{}}
	err := s.view(ctx, func(tx *bolt.Tx) error {
		// The transaction's own id, not the one read above: a commit may
		// have come in between, and this is the state we hold.
		sn.txid = uint64(tx.ID())
		sn.masterID = string(tx.Bucket(bucketMeta).Get(keyMasterID))
		b := tx.Bucket(bucketHosts)
		return b.ForEach(func(k, v []byte) error {
			if len(sn.hosts) >= snapshotMax {
				sn.tooBig, sn.hosts = true, nil
				return errStop
			}
			h, err := s.decode(k, v)
			if err != nil {
				return err
			}
			sn.hosts[string(k)] = h
			return nil
		})
	})
	if err != nil && err != errStop {
		return nil
	}
	s.snap.snap.Store(sn)
	if sn.tooBig {
		return nil
	}
	return sn // possibly of a later commit than txid: newer is as good
}

var errStop = &stopError{}

type stopError struct{}

func (*stopError) Error() string { return "stop" }
