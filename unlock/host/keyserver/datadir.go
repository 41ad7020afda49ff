package keyserver

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver/pkcs11key"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store/boltstore"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store/etcdstore"
	"github.com/unlockrd/unlockrd/unlock/pin"
)

// Files of a data folder.
const (
	MasterKeyFile = "master.key" // 0600, hex; unless --master-key points elsewhere
	TLSKeyFile    = "tls.key"    // 0600, PKCS#8 PEM, ECDSA P-256: the pinned key
	TLSCertFile   = "tls.crt"    // self-signed, remade when the names change
	DBFile        = "hosts.db"   // bbolt, 0600
)

// MasterKeyEnv names the environment variable that may point at the
// master key file instead of <data>/master.key.
const MasterKeyEnv = "UNLOCKRD_MASTER_KEY_FILE"

// ErrWrongMasterKey is wrapped when the master key is not the one the
// data file's keys were sealed under.
var ErrWrongMasterKey = errors.New("wrong master key")

// DataOptions tune OpenData.
type DataOptions struct {
	// Create makes the folder, master key and data file if missing.
	Create bool
	// MasterKeyPath overrides <dir>/master.key. A file there is never
	// created. A pkcs11: URI (RFC 7512) names a key in a PKCS#11 token
	// instead (see pkcs11key); that key is created with Create when the
	// store holds no hosts sealed under another.
	MasterKeyPath string
	// LockTimeout bounds waits for the data file's lock (see boltstore),
	// or each etcd operation, retries included (see etcdstore).
	LockTimeout time.Duration
	// Etcd, if set, keeps the host records in etcd instead of
	// <dir>/hosts.db; the folder then holds only the master key and the
	// TLS material of this replica. Create and LockTimeout apply to it.
	Etcd *etcdstore.Options
}

// Data is an open data folder: its store and the sealer for its keys.
type Data struct {
	Dir string
	// MasterKeyPath is the master key file, or the pkcs11: URI without
	// its PIN.
	MasterKeyPath string
	Store         store.Store
	// Where names the store in messages: the data file, or the etcd
	// endpoints and prefix.
	Where  string
	Sealer *Sealer
}

// OpenData opens the data folder dir. It fails with ErrWrongMasterKey if
// the master key does not match the one the store records, and with
// store.ErrCorrupt if the store's data is unreadable.
func OpenData(ctx context.Context, dir string, o DataOptions) (*Data, error) {
	if dir == "" {
		return nil, errors.New("no data folder given (--data)")
	}
	if o.Etcd != nil {
		return openEtcdData(ctx, dir, o)
	}
	dbPath := filepath.Join(dir, DBFile)
	mkPath := o.MasterKeyPath
	defaultMK := mkPath == ""
	if defaultMK {
		mkPath = filepath.Join(dir, MasterKeyFile)
	}
	_, dbErr := os.Stat(dbPath)
	dbExists := dbErr == nil

	if !o.Create && !dbExists {
		return nil, fmt.Errorf("data folder %s: no %s (run `serve` or `host add` there first): %w", dir, DBFile, dbErr)
	}
	if o.Create {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("data folder %s: %w", dir, err)
		}
	}

	var mk []byte
	var err error
	if pkcs11key.IsURI(mkPath) {
		// A new data file may have its token key made; an existing one
		// needs the key its hosts were sealed under.
		mk, mkPath, err = tokenMasterKey(mkPath, o.Create && !dbExists)
	} else if o.Create && defaultMK && !dbExists {
		// First run: a new folder gets a new master key. Never when a data
		// file exists: its keys are sealed under a key we'd then lack.
		mk, err = CreateMasterKey(mkPath)
	} else {
		mk, err = LoadMasterKey(mkPath)
		if errors.Is(err, os.ErrNotExist) && dbExists {
			err = fmt.Errorf("%w; data file %s needs the master key its keys were sealed under: restore it, or point --master-key / $%s at it",
				err, dbPath, MasterKeyEnv)
		}
	}
	if err != nil {
		return nil, err
	}
	sealer, err := NewSealer(mk)
	clear(mk)
	if err != nil {
		return nil, fmt.Errorf("master key %s: %w", mkPath, err)
	}

	st, err := boltstore.Open(dbPath, boltstore.Options{Create: o.Create, LockTimeout: o.LockTimeout})
	if err != nil {
		return nil, err
	}
	d := &Data{Dir: dir, MasterKeyPath: mkPath, Store: st, Where: "data file " + dbPath, Sealer: sealer}
	if err := d.checkMasterKey(ctx, false); err != nil {
		return nil, err
	}
	return d, nil
}

// openEtcdData is OpenData for records kept in etcd. The master key stays
// a file: every replica needs the same one (copied, or shared by path),
// and etcd, which may be backed up or read by others, never holds it. So
// only the first process to use an empty prefix may make a master key; a
// replica that joins later without one is told to copy it.
func openEtcdData(ctx context.Context, dir string, o DataOptions) (*Data, error) {
	eo := *o.Etcd
	eo.Create = o.Create
	if eo.Timeout == 0 {
		eo.Timeout = o.LockTimeout
	}
	if o.Create {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("data folder %s: %w", dir, err)
		}
	}
	st, err := etcdstore.Open(ctx, eo)
	if err != nil {
		return nil, err
	}
	where := st.String()
	recorded, err := st.MasterKeyID(ctx, "")
	if err != nil {
		st.Close()
		return nil, err
	}
	mkPath := o.MasterKeyPath
	defaultMK := mkPath == ""
	if defaultMK {
		mkPath = filepath.Join(dir, MasterKeyFile)
	}
	var mk []byte
	created := false
	if pkcs11key.IsURI(mkPath) {
		// Replicas share the token (or tokens holding the same key): the
		// first may create the key, the others derive the same master key.
		mk, mkPath, err = tokenMasterKey(mkPath, o.Create && recorded == "")
	} else if _, serr := os.Stat(mkPath); errors.Is(serr, os.ErrNotExist) && o.Create && defaultMK && recorded == "" {
		mk, err = CreateMasterKey(mkPath)
		created = err == nil
	} else {
		mk, err = LoadMasterKey(mkPath)
		if errors.Is(err, os.ErrNotExist) && recorded != "" {
			err = fmt.Errorf("%w; the hosts in %s are sealed under master key %s: copy master.key from a replica that has it, or point --master-key / $%s at it",
				err, where, recorded, MasterKeyEnv)
		}
	}
	if err != nil {
		st.Close()
		return nil, err
	}
	sealer, err := NewSealer(mk)
	clear(mk)
	if err != nil {
		st.Close()
		return nil, fmt.Errorf("master key %s: %w", mkPath, err)
	}
	d := &Data{Dir: dir, MasterKeyPath: mkPath, Store: st, Where: where, Sealer: sealer}
	if err := d.checkMasterKey(ctx, created); err != nil {
		st.Close()
		return nil, err
	}
	return d, nil
}

// tokenMasterKey derives the master key from the PKCS#11 token key uri
// names (see pkcs11key), creating that key if create and absent. It
// returns the URI without its PIN, for messages.
func tokenMasterKey(uri string, create bool) ([]byte, string, error) {
	u, err := pkcs11key.Parse(uri)
	if err != nil {
		return nil, "pkcs11:", err
	}
	mk, _, err := pkcs11key.MasterKey(u, create)
	return mk, u.String(), err
}

// checkMasterKey records our master key's id in a store that has none, or
// checks it against the recorded one. A key we have just created and
// that lost the race to record itself (two replicas' first start at once)
// sealed nothing, so it is removed again rather than left to confuse.
func (d *Data) checkMasterKey(ctx context.Context, created bool) error {
	recorded, err := d.Store.MasterKeyID(ctx, d.Sealer.ID())
	if err != nil {
		return err
	}
	if recorded != d.Sealer.ID() {
		if created {
			os.Remove(d.MasterKeyPath)
		}
		return fmt.Errorf("master key %s (id %s) is not the one %s was sealed under (id %s): %w",
			d.MasterKeyPath, d.Sealer.ID(), d.Where, recorded, ErrWrongMasterKey)
	}
	return nil
}

// Close releases the store (for etcd, its connections).
func (d *Data) Close() error { return d.Store.Close() }

// Admin returns an Admin over the folder's store and sealer.
func (d *Data) Admin() *Admin { return &Admin{Store: d.Store, Sealer: d.Sealer} }

// Problem is a host whose keys don't open.
type Problem struct {
	Host string
	Err  error
}

// Verify reads every record and opens every key, so a server finds out at
// start rather than at a host's boot. A store error (corrupt file) is
// returned; hosts whose keys don't open are listed (the others can still be
// served). It returns the number of hosts.
func (d *Data) Verify(ctx context.Context) (int, []Problem, error) {
	hosts, err := d.Store.List(ctx)
	if err != nil {
		return 0, nil, err
	}
	var probs []Problem
	for _, h := range hosts {
		_, keys, err := UnsealAll(d.Sealer, h)
		for _, k := range keys {
			clear(k)
		}
		if err != nil {
			probs = append(probs, Problem{Host: h.ID, Err: err})
		}
	}
	return len(hosts), probs, nil
}

// TLS returns the folder's certificate for sans (plus DefaultSANs),
// creating the key on first use if create is set, and its pin.
func (d *Data) TLS(sans []string, create bool) (tls.Certificate, pin.Pin, error) {
	return LoadTLS(d.Dir, sans, create)
}

// LoadTLS is Data.TLS for a folder that need not hold a data file.
func LoadTLS(dir string, sans []string, create bool) (tls.Certificate, pin.Pin, error) {
	key, _, err := loadOrCreateKey(filepath.Join(dir, TLSKeyFile), create)
	if err != nil {
		return tls.Certificate{}, pin.Pin{}, err
	}
	c, err := loadOrMakeCert(filepath.Join(dir, TLSCertFile), key, sans)
	if err != nil {
		return c, pin.Pin{}, err
	}
	p, err := PinOf(c)
	return c, p, err
}

// DataPin returns the pin of the folder's TLS key without touching
// anything (the certificate may not exist yet).
func DataPin(dir string) (pin.Pin, error) {
	path := filepath.Join(dir, TLSKeyFile)
	key, err := readECKey(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return pin.Pin{}, fmt.Errorf("data folder %s has no TLS key yet (`serve` or `init` creates it): %w", dir, err)
		}
		return pin.Pin{}, err
	}
	p, err := keyPin(key)
	if err != nil {
		return p, fmt.Errorf("TLS key %s: %w", path, err)
	}
	return p, nil
}
