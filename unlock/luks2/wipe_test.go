package luks2

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding"
	"encoding/hex"
	"errors"
	"hash"
	"os"
	"reflect"
	"slices"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/crypto/pbkdf2"
)

// reachable calls visit with the raw memory of every value reachable from
// root (a pointer): struct fields, unexported ones too, slices up to their
// capacity, pointers and interfaces. It is how the wipe tests look at what
// an object still holds, whatever its type.
func reachable(root any, visit func(b []byte)) {
	seen := map[uintptr]bool{}
	var walk func(v reflect.Value)
	raw := func(v reflect.Value) {
		if v.CanAddr() && v.Type().Size() > 0 {
			visit(unsafe.Slice((*byte)(unsafe.Pointer(v.UnsafeAddr())), v.Type().Size()))
		}
	}
	walk = func(v reflect.Value) {
		switch v.Kind() {
		case reflect.Pointer:
			if v.IsNil() || seen[v.Pointer()] {
				return
			}
			seen[v.Pointer()] = true
			raw(v.Elem())
			walk(v.Elem())
		case reflect.Interface:
			if !v.IsNil() {
				walk(v.Elem())
			}
		case reflect.Struct:
			for i := 0; i < v.NumField(); i++ {
				f := v.Field(i)
				if f.CanAddr() {
					f = reflect.NewAt(f.Type(), unsafe.Pointer(f.UnsafeAddr())).Elem()
				}
				walk(f)
			}
		case reflect.Slice:
			if v.IsNil() || v.Cap() == 0 {
				return
			}
			full := v.Slice3(0, v.Cap(), v.Cap())
			if !seen[full.Pointer()] {
				seen[full.Pointer()] = true
				visit(unsafe.Slice((*byte)(full.UnsafePointer()), uintptr(v.Cap())*v.Type().Elem().Size()))
			}
			for i := 0; i < full.Len(); i++ {
				walk(full.Index(i))
			}
		case reflect.Array:
			for i := 0; i < v.Len(); i++ {
				walk(v.Index(i))
			}
		}
	}
	walk(reflect.ValueOf(root))
}

// keyPatterns are byte strings from which key (an HMAC key under newHash)
// can be had again: the key itself, key⊕ipad and key⊕opad (what
// crypto/hmac keeps), and the hash states after absorbing those pads,
// big-endian as marshaled and in native word order as in a digest.
func keyPatterns(t *testing.T, key []byte, newHash func() hash.Hash) map[string][]byte {
	t.Helper()
	n := min(16, len(key))
	pats := map[string][]byte{"key": bytes.Clone(key[:n])}
	h := newHash()
	bs := h.BlockSize()
	if len(key) > bs {
		h.Write(key)
		key = h.Sum(nil)
	}
	word := 4
	if h.Size() > 32 {
		word = 8
	}
	for name, c := range map[string]byte{"ipad": 0x36, "opad": 0x5c} {
		pad := make([]byte, bs)
		copy(pad, key)
		for i := range pad {
			pad[i] ^= c
		}
		pats["key^"+name] = pad[:16]
		st := newHash()
		st.Write(pad)
		m, err := st.(encoding.BinaryMarshaler).MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		be := bytes.Clone(m[4 : 4+16]) // after the 4-byte magic: the chaining value
		pats[name+" state (marshaled)"] = be
		le := make([]byte, len(be))
		for i := 0; i < len(be); i += word {
			for j := 0; j < word; j++ {
				le[i+j] = be[i+word-1-j]
			}
		}
		pats[name+" state (in memory)"] = le
	}
	return pats
}

// findPatterns reports which of pats occur in the memory reachable from root.
func findPatterns(root any, pats map[string][]byte) []string {
	var found []string
	reachable(root, func(b []byte) {
		for name, p := range pats {
			if bytes.Contains(b, p) && !slices.Contains(found, name) {
				found = append(found, name)
			}
		}
	})
	slices.Sort(found)
	return found
}

// TestScanFindsCryptoHMACKeyState shows the check below can fail: after
// one MAC, crypto/hmac still holds state equivalent to the key, and so
// does our MAC until it is wiped; wiped, ours holds none of it.
func TestScanFindsCryptoHMACKeyState(t *testing.T) {
	key := []byte("volume key 0123456789abcdef-0123456789abcdef")
	pats := keyPatterns(t, key, sha256.New)
	std := hmac.New(sha256.New, key)
	std.Write([]byte("salt"))
	std.Sum(nil)
	std.Reset()
	if found := findPatterns(std, pats); len(found) == 0 {
		t.Fatal("the scan finds nothing in crypto/hmac: it could not catch a leak")
	} else {
		t.Logf("crypto/hmac after use still holds: %v", found)
	}
	m := newMAC(sha256.New, key)
	m.sum(make([]byte, 0, 32), []byte("salt"), nil)
	if found := findPatterns(m, pats); len(found) == 0 {
		t.Fatal("the scan finds nothing in our MAC before wipe")
	}
	m.wipe()
	if found := findPatterns(m, pats); len(found) != 0 {
		t.Fatalf("our MAC after wipe still holds %v", found)
	}
}

// checkScratch asserts that nothing an unsealing kept is readable: every
// buffer zero, every MAC and hash back to a fresh state, and none of the
// secrets' patterns anywhere reachable.
func checkScratch(t *testing.T, sc *scratch, secrets map[string][]byte, newHash func() hash.Hash) {
	t.Helper()
	if len(sc.bufs) == 0 || len(sc.macs) == 0 {
		t.Fatalf("nothing recorded (%d buffers, %d MACs): the check checks nothing", len(sc.bufs), len(sc.macs))
	}
	for i, b := range sc.bufs {
		if !bytes.Equal(b, make([]byte, len(b))) {
			t.Errorf("buffer %d (%d bytes) not wiped", i, len(b))
		}
	}
	// fresh: h marshals as a new hash of its kind does.
	fresh := func(h hash.Hash) bool {
		got, err := h.(encoding.BinaryMarshaler).MarshalBinary()
		for _, nh := range []func() hash.Hash{sha1.New, sha256.New, sha512.New, sha512.New384} {
			if c := nh(); reflect.TypeOf(c) == reflect.TypeOf(h) && c.Size() == h.Size() {
				want, _ := c.(encoding.BinaryMarshaler).MarshalBinary()
				return err == nil && bytes.Equal(got, want)
			}
		}
		return false
	}
	for i, h := range sc.hashes {
		if !fresh(h) {
			t.Errorf("anti-forensic hash %d not scrubbed", i)
		}
	}
	for i, m := range sc.macs {
		for _, b := range [][]byte{m.ipad, m.opad, m.innerState, m.outerState} {
			if !bytes.Equal(b, make([]byte, len(b))) {
				t.Errorf("MAC %d: pad or saved state not wiped", i)
			}
		}
		if !fresh(m.inner) || !fresh(m.outer) {
			t.Errorf("MAC %d: hash state not scrubbed", i)
		}
	}
	for name, s := range secrets {
		if found := findPatterns(sc, keyPatterns(t, s, newHash)); len(found) != 0 {
			t.Errorf("%s still readable after unsealing: %v", name, found)
		}
	}
}

// TestUnsealWipesEverything runs a real unseal (cryptsetup-made keyslot)
// and a failed one (no key fits) and checks every buffer, MAC and hash
// state they used.
func TestUnsealWipesEverything(t *testing.T) {
	pass := []byte("the passphrase that opens it")
	img := formatArgs(t, pass, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--hash", "sha256")
	h, err := readHeaderFile(t, img)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	t.Run("opened", func(t *testing.T) {
		sc := &scratch{}
		keys := keyBufs(pass)
		vk, _, _, err := findKey(context.Background(), f, h, keys, sc)
		if err != nil {
			t.Fatal(err)
		}
		vkCopy := bytes.Clone(vk.Bytes())
		held := vk.Bytes()
		vk.Wipe()
		if !bytes.Equal(held, make([]byte, len(held))) {
			t.Error("volume key not zero after Wipe")
		}
		checkScratch(t, sc, map[string][]byte{"passphrase": pass, "volume key": vkCopy}, sha256.New)
		if !bytes.Equal(keys[0].Bytes(), pass) {
			t.Error("FindKey changed the caller's passphrase")
		}
	})
	t.Run("no key fits", func(t *testing.T) {
		sc := &scratch{}
		wrong := []byte("not the passphrase")
		_, _, _, err := findKey(context.Background(), f, h, keyBufs(wrong), sc)
		if !errors.Is(err, ErrNoKey) {
			t.Fatalf("err = %v", err)
		}
		checkScratch(t, sc, map[string][]byte{"passphrase": wrong}, sha256.New)
	})
}

// TestPBKDF2AgreesWithXCrypto compares our PBKDF2 with x/crypto's for
// every LUKS hash, short and long passwords (longer than a block, which
// HMAC hashes first), and lengths that end mid-block.
func TestPBKDF2AgreesWithXCrypto(t *testing.T) {
	long := bytes.Repeat([]byte("long password "), 20)
	for _, name := range []string{"sha1", "sha256", "sha384", "sha512"} {
		for _, pw := range [][]byte{[]byte("p"), []byte("password"), long} {
			for _, iter := range []int{1, 2, 1000, 2049} {
				for _, n := range []int{1, 20, 32, 33, 64, 100} {
					salt := []byte("salt of the keyslot")
					got, err := pbkdf2Key(context.Background(), hashFunc(name), pw, salt, iter, n, nil)
					if err != nil {
						t.Fatal(err)
					}
					want := pbkdf2.Key(pw, salt, iter, n, hashFunc(name))
					if !bytes.Equal(got.Bytes(), want) {
						t.Fatalf("%s, %d-byte password, %d iterations, %d bytes: %x, want %x", name, len(pw), iter, n, got.Bytes(), want)
					}
					got.Wipe()
				}
			}
		}
	}
}

// TestPBKDF2RFC6070 are the remaining RFC 6070 vectors (TestPBKDF2Vectors
// has the 4096-iteration ones).
func TestPBKDF2RFC6070(t *testing.T) {
	for _, tc := range []struct {
		p, s string
		c, n int
		want string
	}{
		{"password", "salt", 1, 20, "0c60c80f961f0e71f3a9b524af6012062fe037a6"},
		{"password", "salt", 2, 20, "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957"},
		{"pass\x00word", "sa\x00lt", 4096, 16, "56fa6aa75548099dcc37d7f03425e0c3"},
	} {
		got, err := pbkdf2Key(context.Background(), sha1.New, []byte(tc.p), []byte(tc.s), tc.c, tc.n, nil)
		if err != nil {
			t.Fatal(err)
		}
		if hex.EncodeToString(got.Bytes()) != tc.want {
			t.Errorf("%q/%q/%d: %x, want %s", tc.p, tc.s, tc.c, got.Bytes(), tc.want)
		}
	}
}

// stopsWithin runs findKey and fails if it has not returned long after
// the context's deadline (a wait for a hang, not a speed assertion: the
// slot would take minutes).
func stopsWithin(t *testing.T, img string, h *Header, pass []byte) error {
	t.Helper()
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		vk, _, _, err := FindKey(ctx, f, h, keyBufs(pass))
		vk.Wipe()
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(2 * time.Minute):
		t.Fatal("FindKey still running two minutes after its deadline")
	}
	return nil
}

// TestDeadlineStopsSlowKeyslot: a keyslot rewritten to a huge cost is
// stopped by the context inside the KDF, not after it.
func TestDeadlineStopsSlowKeyslot(t *testing.T) {
	pass := []byte("p")
	t.Run("pbkdf2", func(t *testing.T) {
		img := format(t, pass)
		editBoth(t, img, func(m map[string]any) {
			m["keyslots"].(map[string]any)["0"].(map[string]any)["kdf"].(map[string]any)["iterations"] = 1<<31 - 1
		})
		h, err := readHeaderFile(t, img)
		if err != nil {
			t.Fatal(err)
		}
		if err := stopsWithin(t, img, h, pass); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("digest pbkdf2", func(t *testing.T) {
		img := format(t, pass)
		editBoth(t, img, func(m map[string]any) {
			m["digests"].(map[string]any)["0"].(map[string]any)["iterations"] = 1<<31 - 1
		})
		h, err := readHeaderFile(t, img)
		if err != nil {
			t.Fatal(err)
		}
		if err := stopsWithin(t, img, h, pass); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("argon2id", func(t *testing.T) {
		img := formatArgs(t, pass, "--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "8192", "--pbkdf-parallel", "1")
		editBoth(t, img, func(m map[string]any) {
			m["keyslots"].(map[string]any)["0"].(map[string]any)["kdf"].(map[string]any)["time"] = 300
		})
		h, err := readHeaderFile(t, img)
		if err != nil {
			t.Fatal(err)
		}
		if err := stopsWithin(t, img, h, pass); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v", err)
		}
	})
}
