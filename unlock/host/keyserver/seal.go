package keyserver

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// MasterKeySize is the length of the master key: AES-256.
const MasterKeySize = 32

// sealVersion prefixes every sealed key so the format can change later.
const sealVersion = 1

// ErrUnseal is wrapped when a sealed key does not open: wrong master key,
// a record copied to another host or key id, or tampered bytes. GCM can't
// tell these apart, and the message must not pretend it can.
var ErrUnseal = errors.New("sealed key does not open (wrong master key, moved or tampered record)")

// Sealer seals host keys under the master key with AES-256-GCM. The host id
// and key id are the associated data, so a sealed key only opens as the key
// it was sealed as: copying it to another host, or swapping the order of a
// host's keys, makes it fail to open.
type Sealer struct {
	aead cipher.AEAD
	id   string
}

// NewSealer returns a Sealer for a MasterKeySize-byte master key. It keeps
// no reference to masterKey; the caller should wipe it.
func NewSealer(masterKey []byte) (*Sealer, error) {
	if len(masterKey) != MasterKeySize {
		return nil, fmt.Errorf("master key is %d bytes, want %d", len(masterKey), MasterKeySize)
	}
	block, err := aes.NewCipher(masterKey)
	if err != nil {
		return nil, fmt.Errorf("master key: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("master key: %w", err)
	}
	// The id is a MAC of a constant: it names the key without revealing it,
	// so data files can record which key they were sealed under.
	m := hmac.New(sha256.New, masterKey)
	m.Write([]byte("unlockrd/master-key-id/v1"))
	return &Sealer{aead: aead, id: "mk1-" + hex.EncodeToString(m.Sum(nil)[:8])}, nil
}

// ID names the master key (a MAC of a constant under it, safe to log).
func (s *Sealer) ID() string { return s.id }

func additionalData(hostID, keyID string) []byte {
	// Length-prefixed, so no choice of ids can make two pairs collide.
	ad := []byte("unlockrd/sealed-key/v1")
	ad = binary.BigEndian.AppendUint32(ad, uint32(len(hostID)))
	ad = append(ad, hostID...)
	ad = binary.BigEndian.AppendUint32(ad, uint32(len(keyID)))
	return append(ad, keyID...)
}

// Seal encrypts key as key keyID of host hostID. The result is
// version || nonce || ciphertext+tag.
func (s *Sealer) Seal(hostID, keyID string, key []byte) ([]byte, error) {
	out := make([]byte, 1+s.aead.NonceSize(), 1+s.aead.NonceSize()+len(key)+s.aead.Overhead())
	out[0] = sealVersion
	// Random 96-bit nonces are safe far beyond the number of keys a key
	// service will ever seal under one master key.
	if _, err := rand.Read(out[1:]); err != nil {
		return nil, fmt.Errorf("host %q key %q: nonce: %w", hostID, keyID, err)
	}
	return s.aead.Seal(out, out[1:], key, additionalData(hostID, keyID)), nil
}

// Unseal opens a key sealed by Seal for the same host id and key id. The
// caller owns the result and must wipe it.
func (s *Sealer) Unseal(hostID, keyID string, sealed []byte) ([]byte, error) {
	ns := s.aead.NonceSize()
	if len(sealed) < 1+ns+s.aead.Overhead() || sealed[0] != sealVersion {
		return nil, fmt.Errorf("host %q key %q: %w", hostID, keyID, ErrUnseal)
	}
	key, err := s.aead.Open(nil, sealed[1:1+ns], sealed[1+ns:], additionalData(hostID, keyID))
	if err != nil {
		return nil, fmt.Errorf("host %q key %q: %w", hostID, keyID, ErrUnseal)
	}
	return key, nil
}

// LoadMasterKey reads a master key file: exactly 32 raw bytes, or 64 hex
// digits, or 32 bytes in standard base64 (surrounding whitespace allowed),
// so keys from secret managers and systemd credentials work as they come.
// A file that group or others can read is refused, as ssh does with keys.
func LoadMasterKey(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("master key %s: %w", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("master key %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("master key %s: not a regular file", path)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("master key %s: mode %04o lets group or others read it; chmod 600 it", path, fi.Mode().Perm())
	}
	buf := make([]byte, 256)
	defer clear(buf)
	n, err := io.ReadFull(f, buf)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("master key %s: %w", path, err)
	}
	if n == len(buf) {
		return nil, fmt.Errorf("master key %s: file too large for a key", path)
	}
	data := buf[:n]
	key := make([]byte, MasterKeySize)
	if len(data) == MasterKeySize {
		copy(key, data)
		return key, nil
	}
	t := bytes.TrimSpace(data)
	switch len(t) {
	case 2 * MasterKeySize:
		if _, err := hex.Decode(key, t); err == nil {
			return key, nil
		}
	case base64.StdEncoding.EncodedLen(MasterKeySize):
		if n, err := base64.StdEncoding.Decode(key, t); err == nil && n == MasterKeySize {
			return key, nil
		}
	}
	clear(key)
	return nil, fmt.Errorf("master key %s: want %d raw bytes, %d hex digits or base64 of %d bytes",
		path, MasterKeySize, 2*MasterKeySize, MasterKeySize)
}

// CreateMasterKey makes a new random master key file (mode 0600, hex) at
// path. It never replaces an existing file: losing a master key loses every
// host's keys, so if path exists the existing key is loaded instead.
func CreateMasterKey(path string) ([]byte, error) {
	key := make([]byte, MasterKeySize)
	if _, err := rand.Read(key); err != nil {
		return nil, fmt.Errorf("master key %s: %w", path, err)
	}
	text := make([]byte, 2*MasterKeySize+1)
	hex.Encode(text, key)
	text[len(text)-1] = '\n'
	err := writeNew(path, text, 0o600)
	clear(text)
	if errors.Is(err, os.ErrExist) {
		clear(key)
		return LoadMasterKey(path)
	}
	if err != nil {
		clear(key)
		return nil, fmt.Errorf("master key %s: %w", path, err)
	}
	return key, nil
}

// writeNew creates path with data, durably and without replacing an
// existing file (os.ErrExist then): written under a temporary name, synced,
// hard-linked into place, and the directory synced.
func writeNew(path string, data []byte, perm os.FileMode) error {
	return install(path, data, perm, func(tmp, path string) error {
		if err := os.Link(tmp, path); err != nil {
			if errors.Is(err, os.ErrExist) {
				return os.ErrExist
			}
			return err
		}
		return nil
	})
}

// install writes data to a synced temporary file beside path, puts it in
// place with place (link: never replace; rename: replace atomically), and
// syncs the directory so the new name survives a crash.
func install(path string, data []byte, perm os.FileMode, place func(tmp, path string) error) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".new-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := place(tmp.Name(), path); err != nil {
		return err
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
