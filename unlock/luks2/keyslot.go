package luks2

import (
	"bufio"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/unlockrd/unlockrd/unlock/luks2/argon2"
	"github.com/unlockrd/unlockrd/unlock/secret"
	"golang.org/x/crypto/xts"
)

// Keyslots are unsealed here, from the validated Header, rather than by a
// library that re-reads the device: a library that parses the header again
// can see another header than the one validated (the device may change in
// between, and a damaged primary with an intact secondary is not something
// it handles), and it keeps the volume key where it cannot be wiped.

// ErrWrongKey is returned by Unseal when the passphrase does not open the
// keyslot.
var ErrWrongKey = errors.New("passphrase does not open the keyslot")

// ErrNoKey is wrapped by FindKey when no key opens any keyslot.
var ErrNoKey = errors.New("no key opens the volume")

// scratch is every buffer and MAC one unsealing allocates, so that one
// wipe clears them all, and so that a test can check it did. A nil
// *scratch keeps nothing (the buffers are still wiped where they are used).
type scratch struct {
	bufs   [][]byte
	macs   []*mac
	hashes []hash.Hash
}

func (s *scratch) keepBuf(b []byte) {
	if s != nil {
		s.bufs = append(s.bufs, b)
	}
}

func (s *scratch) keepMAC(m *mac) {
	if s != nil {
		s.macs = append(s.macs, m)
	}
}

func (s *scratch) keepHash(h hash.Hash) {
	if s != nil {
		s.hashes = append(s.hashes, h)
	}
}

// Unseal derives the volume key from keyslot slot of h with passphrase.
// r is the LUKS device; only the keyslot area is read from it. The caller
// owns the returned key and wipes it; every intermediate (area key, split
// key material, MAC and hash states) is wiped before Unseal returns. ctx
// is checked inside the KDF, so a deadline stops a slow keyslot.
func Unseal(ctx context.Context, r io.ReaderAt, h *Header, slot int, passphrase *secret.Buf) (*secret.Buf, error) {
	return unseal(ctx, r, h, slot, passphrase, nil)
}

func unseal(ctx context.Context, r io.ReaderAt, h *Header, slot int, passphrase *secret.Buf, sc *scratch) (*secret.Buf, error) {
	k, ok := h.Keyslot(slot)
	if !ok {
		return nil, fmt.Errorf("no keyslot %d", slot)
	}
	d := h.digestFor(slot)
	if d == nil {
		return nil, fmt.Errorf("keyslot %d has no digest", slot)
	}
	if k.KeySize <= 0 || k.KeySize > 512 {
		return nil, fmt.Errorf("keyslot %d: %d-byte key", slot, k.KeySize)
	}
	// The area length is a whole number of 512-byte sectors for every
	// key size cryptsetup writes; round up for the odd ones.
	n := int64(k.KeySize) * afStripes
	if (n+511)/512*512 > k.Area.Size {
		return nil, fmt.Errorf("keyslot %d: area of %d bytes is smaller than its %d-byte key material", slot, k.Area.Size, (n+511)/512*512)
	}
	buf := make([]byte, (n+511)/512*512)
	sc.keepBuf(buf)
	defer clear(buf)
	if _, err := r.ReadAt(buf, k.Area.Offset); err != nil {
		return nil, fmt.Errorf("keyslot %d: read area: %w", slot, err)
	}
	areaKey, err := deriveKDF(ctx, k.KDF, passphrase.Bytes(), k.Area.KeySize, sc)
	if err != nil {
		return nil, fmt.Errorf("keyslot %d: %w", slot, err)
	}
	sc.keepBuf(areaKey.Bytes())
	err = decryptArea(k.Area.Encryption, areaKey.Bytes(), buf)
	areaKey.Wipe()
	if err != nil {
		return nil, fmt.Errorf("keyslot %d: %w", slot, err)
	}
	key, err := afMerge(buf[:n], k.KeySize, afStripes, hashFunc(k.AF.Hash), sc)
	if err != nil {
		return nil, fmt.Errorf("keyslot %d: %w", slot, err)
	}
	got, err := pbkdf2Key(ctx, hashFunc(d.Hash), key.Bytes(), d.Salt, d.Iterations, len(d.Digest), sc)
	if err != nil {
		key.Wipe()
		return nil, fmt.Errorf("keyslot %d: digest: %w", slot, err)
	}
	match := subtle.ConstantTimeCompare(got.Bytes(), d.Digest) == 1
	got.Wipe()
	if !match {
		key.Wipe()
		return nil, ErrWrongKey
	}
	return key, nil
}

// deriveKDF runs the keyslot's KDF. argon2 is unlock/luks2/argon2: its
// memory is mapped for this one computation and unmapped (wiped) before it
// returns, since a small VM needs it for the rest of the boot, and it
// stops soon after ctx ends.
func deriveKDF(ctx context.Context, k KDF, pass []byte, n int, sc *scratch) (*secret.Buf, error) {
	switch k.Type {
	case "pbkdf2":
		return pbkdf2Key(ctx, hashFunc(k.Hash), pass, k.Salt, k.Iterations, n, sc)
	case "argon2i", "argon2id":
		// Checked before mapping: running out halfway would bring the
		// OOM killer to PID 1 (which it cannot kill: the kernel panics).
		if avail, ok := memAvailableKiB(); ok && uint64(k.Memory) > avail {
			return nil, fmt.Errorf("%s needs %d MiB of memory, only %d MiB available", k.Type, k.Memory>>10, avail>>10)
		}
		mode := argon2.ID
		if k.Type == "argon2i" {
			mode = argon2.I
		}
		// Header validation bounds these (time, memory, lanes ≤ 16).
		return argon2.Key(ctx, argon2.Params{Mode: mode, Time: uint32(k.Time), MemoryKiB: uint32(k.Memory),
			Lanes: uint8(k.CPUs), KeyLen: uint32(n)}, pass, k.Salt)
	}
	return nil, fmt.Errorf("KDF %q", k.Type)
}

// memAvailableKiB reads MemAvailable from /proc/meminfo.
func memAvailableKiB() (uint64, bool) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "MemAvailable:"); ok {
			n, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n, err == nil
		}
	}
	return 0, false
}

// decryptArea decrypts a keyslot area in place: 512-byte sectors numbered
// from 0 at the start of the area, as cryptsetup writes them.
func decryptArea(enc string, key, buf []byte) error {
	if !areaKeySizeOK(enc, len(key)) {
		return fmt.Errorf("area cipher %s with a %d-byte key", enc, len(key))
	}
	// The expanded keys are as secret as key.
	var keys secret.AESKeys
	defer keys.Wipe()
	switch enc {
	case "aes-xts-plain64", "aes-xts-plain":
		c, err := xts.NewCipher(keys.New, key)
		if err != nil {
			return err
		}
		for i := 0; i < len(buf)/512; i++ {
			s := buf[i*512 : (i+1)*512]
			c.Decrypt(s, s, uint64(i))
		}
		return nil
	case "aes-cbc-essiv:sha256":
		b, err := keys.New(key)
		if err != nil {
			return err
		}
		salt := sha256.Sum256(key)
		essiv, err := keys.New(salt[:])
		clear(salt[:])
		if err != nil {
			return err
		}
		iv := make([]byte, aes.BlockSize)
		for i := 0; i < len(buf)/512; i++ {
			clear(iv)
			binary.LittleEndian.PutUint64(iv, uint64(i))
			essiv.Encrypt(iv, iv)
			s := buf[i*512 : (i+1)*512]
			cipher.NewCBCDecrypter(b, iv).CryptBlocks(s, s)
		}
		return nil
	}
	return fmt.Errorf("area cipher %q is not supported", enc)
}

// areaKeySizeOK reports whether n is a key size enc takes.
func areaKeySizeOK(enc string, n int) bool {
	switch enc {
	case "aes-xts-plain64", "aes-xts-plain":
		return n == 32 || n == 64
	case "aes-cbc-essiv:sha256":
		return n == 16 || n == 24 || n == 32
	}
	return false
}

// hashFunc maps a LUKS hash name to its implementation, or nil.
func hashFunc(name string) func() hash.Hash {
	switch name {
	case "sha1":
		return sha1.New
	case "sha256":
		return sha256.New
	case "sha512":
		return sha512.New
	case "sha384":
		return sha512.New384
	}
	return nil
}

// afMerge undoes LUKS's anti-forensic split: stripes blocks of n bytes,
// each XORed into a running buffer that is then diffused with the hash.
// The hash state and the temporary buffer are wiped before it returns.
func afMerge(src []byte, n, stripes int, newHash func() hash.Hash, sc *scratch) (*secret.Buf, error) {
	if n <= 0 || len(src) < n*stripes || newHash == nil {
		return nil, fmt.Errorf("anti-forensic merge of %d bytes into %d x %d", len(src), stripes, n)
	}
	h := newHash()
	sc.keepHash(h)
	defer secret.ScrubHash(h)
	key := secret.New(n)
	buf := key.Bytes()
	tmp := make([]byte, 0, n+h.Size())
	sc.keepBuf(tmp[:cap(tmp)])
	defer clear(tmp[:cap(tmp)])
	for i := 0; i < stripes-1; i++ {
		subtle.XORBytes(buf, buf, src[i*n:(i+1)*n])
		tmp = diffuse(h, buf, tmp[:0])
		copy(buf, tmp)
	}
	subtle.XORBytes(buf, buf, src[(stripes-1)*n:stripes*n])
	return key, nil
}

// diffuse hashes buf in digest-sized pieces, each prefixed with its
// big-endian index, and appends the result (truncated to len(buf)).
func diffuse(h hash.Hash, buf, out []byte) []byte {
	ds := h.Size()
	var iv [4]byte
	for i := 0; i*ds < len(buf); i++ {
		end := min((i+1)*ds, len(buf))
		binary.BigEndian.PutUint32(iv[:], uint32(i))
		h.Reset()
		h.Write(iv[:])
		h.Write(buf[i*ds : end])
		out = h.Sum(out)
		out = out[:end]
	}
	return out
}

// FindKey tries every key on every usable keyslot, keys in server order
// (current first) and slots by priority. It only reads the device. The
// returned volume key belongs to the caller, who wipes it; the keys stay
// the caller's too. ctx is checked inside every KDF: when it ends, FindKey
// returns its error at once.
func FindKey(ctx context.Context, r io.ReaderAt, h *Header, keys []*secret.Buf) (*secret.Buf, int, int, error) {
	return findKey(ctx, r, h, keys, nil)
}

func findKey(ctx context.Context, r io.ReaderAt, h *Header, keys []*secret.Buf, sc *scratch) (*secret.Buf, int, int, error) {
	slots := h.SlotOrder()
	var errs []error
	for ki, key := range keys {
		for _, slot := range slots {
			if err := ctx.Err(); err != nil {
				return nil, 0, 0, fmt.Errorf("stopped before key %d on keyslot %d: %w", ki+1, slot, err)
			}
			vk, err := unseal(ctx, r, h, slot, key, sc)
			if err != nil && ctx.Err() != nil {
				return nil, 0, 0, fmt.Errorf("stopped in key %d on keyslot %d: %w", ki+1, slot, err)
			}
			if errors.Is(err, ErrWrongKey) {
				continue
			}
			if err != nil {
				// A keyslot we cannot compute (too little memory for its
				// argon2, say) must not hide one that works.
				errs = append(errs, err)
				continue
			}
			return vk, slot, ki, nil
		}
	}
	err := fmt.Errorf("%w (%d keys tried on %d keyslots); nothing was written to it", ErrNoKey, len(keys), len(slots))
	if len(errs) > 0 {
		err = fmt.Errorf("%w; %w", err, errors.Join(errs...))
	}
	return nil, 0, 0, err
}
