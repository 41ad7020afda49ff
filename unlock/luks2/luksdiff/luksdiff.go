// Package luksdiff is test support for the differential test of our LUKS2
// header reader against cryptsetup: it makes real headers with cryptsetup,
// mutates them as an attacker would (JSON edits, binary-header edits, both
// copies, checksum recomputed after each edit), and asks cryptsetup for its
// verdict on each, caching verdicts by content hash because a cryptsetup run
// costs tens of milliseconds.
package luksdiff

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// Binary header layout of one LUKS2 copy (LUKS2 on-disk format, §2).
const (
	binSize      = 4096
	offMagic     = 0x000
	offVersion   = 0x006
	offHdrSize   = 0x008
	offSeqID     = 0x010
	offLabel     = 0x018
	offCsumAlg   = 0x048
	offSalt      = 0x068
	offUUID      = 0x0a8
	offSubsys    = 0x0d0
	offHdrOff    = 0x100
	offCsum      = 0x1c0
	csumLen      = 64
	primaryMagic = "LUKS\xba\xbe"
	secondMagic  = "SKUL\xba\xbe"
)

// Base is a real header made by cryptsetup.
type Base struct {
	Name string
	// Image is the file's first FileSize bytes that matter: both header
	// copies (the keyslot material is not needed to judge a header).
	Image    []byte
	HdrSize  int64
	FileSize int64
}

// BaseSpec says how one base is made: luksFormat arguments, then extra
// cryptsetup commands run on the file (with %s for the file name).
type BaseSpec struct {
	Name   string
	Format []string
	// Then are further cryptsetup argument lists; the passphrase "pw" is
	// the existing key, "pw2" a new one, both given on stdin/files.
	Then [][]string
	// Token is a token JSON imported with `cryptsetup token import`.
	Token string
}

const tiny = "--pbkdf-force-iterations"

// Specs are the bases the corpus is generated from: every metadata size,
// pbkdf2, argon2i and argon2id with tiny costs, several keyslots, tokens,
// an unbound keyslot, sector sizes 512 and 4096.
func Specs() []BaseSpec {
	pb := []string{"--pbkdf", "pbkdf2", tiny, "1000"}
	a2i := []string{"--pbkdf", "argon2i", tiny, "4", "--pbkdf-memory", "32", "--pbkdf-parallel", "1"}
	a2id := []string{"--pbkdf", "argon2id", tiny, "4", "--pbkdf-memory", "32", "--pbkdf-parallel", "1"}
	cat := func(a ...[]string) []string {
		var r []string
		for _, x := range a {
			r = append(r, x...)
		}
		return r
	}
	var s []BaseSpec
	for _, md := range []string{"16k", "32k", "64k", "128k", "256k", "512k", "1m", "2m", "4m"} {
		s = append(s, BaseSpec{Name: "pbkdf2-md" + md, Format: cat(pb, []string{"--luks2-metadata-size", md, "--luks2-keyslots-size", "2m", "--sector-size", "512"})})
	}
	s = append(s,
		BaseSpec{Name: "argon2i-4k", Format: cat(a2i, []string{"--sector-size", "4096", "--luks2-keyslots-size", "2m"})},
		BaseSpec{Name: "argon2id-multi", Format: cat(a2id, []string{"--luks2-keyslots-size", "4m", "--label", "data", "--subsystem", "sub"}),
			Then: [][]string{cat([]string{"luksAddKey"}, pb), cat([]string{"luksAddKey", "--unbound", "--key-size", "512"}, a2i)}},
		BaseSpec{Name: "pbkdf2-tokens", Format: cat(pb, []string{"--luks2-metadata-size", "64k", "--luks2-keyslots-size", "2m"}),
			Then:  [][]string{cat([]string{"luksAddKey", "--key-slot", "5"}, pb)},
			Token: `{"type":"unlockrd-test","keyslots":["0","5"],"note":"x"}`},
		BaseSpec{Name: "unbound", Format: cat(pb, []string{"--luks2-keyslots-size", "2m"}),
			Then: [][]string{cat([]string{"luksAddKey", "--unbound", "--key-size", "256"}, pb)}},
	)
	return s
}

// MakeBases makes (or loads from dir) every base in specs. Bases are kept
// in dir so that the corpus, and so the verdict cache, is stable.
func MakeBases(dir string, specs []BaseSpec) ([]Base, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	var out []Base
	for _, sp := range specs {
		h := sha256.Sum256([]byte(fmt.Sprint(sp)))
		p := filepath.Join(dir, sp.Name+"-"+hex.EncodeToString(h[:6])+".img")
		if _, err := os.Stat(p); err != nil {
			if err := makeBase(p, sp); err != nil {
				return nil, fmt.Errorf("base %s: %w", sp.Name, err)
			}
		}
		b, err := loadBase(sp.Name, p)
		if err != nil {
			return nil, fmt.Errorf("base %s: %w", sp.Name, err)
		}
		out = append(out, b)
	}
	return out, nil
}

func makeBase(path string, sp BaseSpec) error {
	tmp := path + ".tmp"
	defer os.Remove(tmp)
	if err := os.WriteFile(tmp, nil, 0o600); err != nil {
		return err
	}
	if err := os.Truncate(tmp, 24<<20); err != nil {
		return err
	}
	dir := filepath.Dir(path)
	pw := filepath.Join(dir, "pw")
	if err := os.WriteFile(pw, []byte("pw"), 0o600); err != nil {
		return err
	}
	pw2 := filepath.Join(dir, "pw2")
	if err := os.WriteFile(pw2, []byte("pw2"), 0o600); err != nil {
		return err
	}
	run := func(stdin string, args ...string) error {
		cmd := exec.Command("cryptsetup", args...)
		cmd.Stdin = strings.NewReader(stdin)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("cryptsetup %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	if err := run("", append(append([]string{"luksFormat", "-q", "--type", "luks2", "--key-file", pw}, sp.Format...), tmp)...); err != nil {
		return err
	}
	for _, t := range sp.Then {
		args := append([]string{t[0], "-q", "--key-file", pw}, t[1:]...)
		if err := run("", append(args, tmp, pw2)...); err != nil {
			return err
		}
	}
	if sp.Token != "" {
		if err := run(sp.Token, "token", "import", tmp); err != nil {
			return err
		}
	}
	return os.Rename(tmp, path)
}

func loadBase(name, path string) (Base, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Base{}, err
	}
	hs := int64(binary.BigEndian.Uint64(b[offHdrSize:]))
	var m map[string]any
	if err := decode(jsonOf(b, 0, hs), &m); err != nil {
		return Base{}, err
	}
	data := int64(len(b))
	if segs, ok := m["segments"].(map[string]any); ok {
		if s0, ok := segs["0"].(map[string]any); ok {
			if o, err := strconv.ParseInt(fmt.Sprint(s0["offset"]), 10, 64); err == nil {
				data = o
			}
		}
	}
	return Base{Name: name, Image: b[:2*hs], HdrSize: hs, FileSize: data + 1<<20}, nil
}

func jsonOf(img []byte, off, hs int64) []byte {
	js := img[off+binSize : off+hs]
	if i := bytes.IndexByte(js, 0); i >= 0 {
		js = js[:i]
	}
	return js
}

func decode(js []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(js))
	d.UseNumber()
	return d.Decode(v)
}

// Case is one mutated header.
type Case struct {
	Base     string
	Class    string // mutation class, for the per-class counts
	Desc     string
	Image    []byte // both copies; the file is this, then zeroes to FileSize
	FileSize int64
}

// Hash names the case in the verdict cache.
func (c Case) Hash() string {
	h := sha256.New()
	h.Write(c.Image)
	fmt.Fprint(h, c.FileSize)
	return hex.EncodeToString(h.Sum(nil))
}

// WriteFile writes the case as a sparse image file.
func (c Case) WriteFile(path string) error {
	if err := os.WriteFile(path, c.Image, 0o600); err != nil {
		return err
	}
	return os.Truncate(path, c.FileSize)
}

// Reseal recomputes the SHA-256 checksum of the copy at off: over the
// binary header with the checksum field zeroed, then the JSON area.
func Reseal(img []byte, off int64) {
	hs := int64(binary.BigEndian.Uint64(img[off+offHdrSize:]))
	if hs < binSize || off+hs > int64(len(img)) {
		hs = int64(len(img)) / 2 // a mutated size: seal what the base had
	}
	cp := img[off : off+hs]
	clear(cp[offCsum : offCsum+csumLen])
	sum := sha256.Sum256(cp)
	copy(cp[offCsum:], sum[:])
}

// CryptsetupVerdict runs `cryptsetup isLuks` and `cryptsetup luksDump`
// (LUKS2_hdr_validate is their oracle) on the case, caching by hash in
// cacheDir. It returns true when cryptsetup accepts the header.
func CryptsetupVerdict(c Case, tmpDir, cacheDir string) (bool, error) {
	key := c.Hash()
	cp := filepath.Join(cacheDir, key[:2], key)
	if b, err := os.ReadFile(cp); err == nil {
		return string(b) == "accept", nil
	}
	f := filepath.Join(tmpDir, key[:16]+".img")
	if err := c.WriteFile(f); err != nil {
		return false, err
	}
	defer os.Remove(f)
	ok := exec.Command("cryptsetup", "isLuks", "--disable-locks", "--disable-external-tokens", f).Run() == nil
	if ok {
		err := exec.Command("cryptsetup", "luksDump", "--disable-locks", "--disable-external-tokens", f).Run()
		if err != nil {
			if _, exit := err.(*exec.ExitError); !exit {
				return false, err
			}
			ok = false
		}
	}
	v := "reject"
	if ok {
		v = "accept"
	}
	if err := os.MkdirAll(filepath.Dir(cp), 0o755); err == nil {
		_ = os.WriteFile(cp, []byte(v), 0o644)
	}
	return ok, nil
}

// Classes are the mutation classes, in report order.
var Classes = []string{"json-area", "keyslot-areas", "references", "segments", "tokens", "binary", "kdf", "integers", "generic"}

// Generate makes n mutated cases from bases with a fixed seed. Every class
// gets a share; each case applies one or two edits.
func Generate(bases []Base, n int, seed uint64) []Case {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	var out []Case
	for i := 0; len(out) < n && i < 20*n; i++ {
		b := bases[r.IntN(len(bases))]
		class := Classes[i%len(Classes)]
		c, ok := mutate(r, b, class)
		if ok {
			out = append(out, c)
		}
	}
	// The unmutated bases are cases too: cryptsetup made them, so both
	// sides must accept them (modulo our policy).
	for _, b := range bases {
		out = append(out, Case{Base: b.Name, Class: "base", Desc: "unmutated", Image: bytes.Clone(b.Image), FileSize: b.FileSize})
	}
	return out
}

// edge integer values, as JSON numbers and as decimal strings.
var edges = []string{"0", "-1", "1", "9223372036854775807", "9223372036854775808", "18446744073709551615", "18446744073709551616",
	"4294967295", "4294967296", "2147483647", "2147483648", "1099511627776", "1048576", "33", "32", "31", "1023", "512", "511", "4097"}

type doc = map[string]any

func mutate(r *rand.Rand, b Base, class string) (Case, bool) {
	img := bytes.Clone(b.Image)
	hs := b.HdrSize
	var m doc
	if err := decode(jsonOf(img, 0, hs), &m); err != nil {
		return Case{}, false
	}
	c := Case{Base: b.Name, Class: class, FileSize: b.FileSize}
	// which copies a JSON edit lands in: mostly both, sometimes one.
	copies := []int64{0, hs}
	switch r.IntN(6) {
	case 0:
		copies = []int64{0}
	case 1:
		copies = []int64{hs}
	}
	var desc []string
	setJSON := func(js []byte) bool {
		for _, off := range copies {
			area := img[off+binSize : off+hs]
			if len(js) > len(area) {
				return false
			}
			clear(area)
			copy(area, js)
		}
		return true
	}
	rawDone := false
	switch class {
	case "json-area":
		js, _ := json.Marshal(m)
		switch r.IntN(8) {
		case 0:
			js = append(js, 0, 'x', '}')
			desc = append(desc, "data after NUL")
		case 1:
			js = append(js, bytes.Repeat([]byte(" "), int(hs-binSize)-len(js))...)
			desc = append(desc, "no NUL in JSON area")
		case 2:
			js = append([]byte(" "), js...)
			desc = append(desc, "leading space")
		case 3:
			js = append(js, []byte(" {}")...)
			desc = append(desc, "second JSON value")
		case 4:
			js = append([]byte("["), append(js, ']')...)
			desc = append(desc, "array at top level")
		case 5:
			js = append(js[:len(js)-1], []byte(`,"keyslots":{}}`)...)
			desc = append(desc, "duplicate top-level key")
		case 6:
			sec := pick(r, []string{"keyslots", "tokens", "segments", "digests", "config"})
			m[sec] = pick(r, []any{[]any{}, "x", json.Number("1"), nil, true})
			js, _ = json.Marshal(m)
			desc = append(desc, "section "+sec+" wrong type")
		case 7:
			sec := pick(r, []string{"keyslots", "tokens", "segments", "digests", "config"})
			if r.IntN(2) == 0 {
				delete(m, sec)
				desc = append(desc, "section "+sec+" removed")
			} else {
				m["extra"] = doc{}
				desc = append(desc, "extra top-level section")
			}
			js, _ = json.Marshal(m)
		}
		if !setJSON(js) {
			return Case{}, false
		}
		rawDone = true
	case "keyslot-areas":
		ks := objs(m, "keyslots")
		cfg, _ := m["config"].(doc)
		switch r.IntN(6) {
		case 0, 1:
			if len(ks) < 2 {
				return Case{}, false
			}
			a, b2 := ks[0]["area"].(doc), ks[1]["area"].(doc)
			if r.IntN(2) == 0 {
				b2["offset"], b2["size"] = a["offset"], a["size"]
				desc = append(desc, "identical areas")
			} else {
				o, _ := strconv.ParseInt(fmt.Sprint(a["offset"]), 10, 64)
				b2["offset"] = strconv.FormatInt(o+4096, 10)
				desc = append(desc, "overlapping areas")
			}
		case 2:
			a := ks[r.IntN(len(ks))]["area"].(doc)
			a[pick(r, []string{"offset", "size"})] = pick(r, edges)
			desc = append(desc, "area field edge")
		default:
			k := pick(r, []string{"keyslots_size", "json_size"})
			v := pick(r, append(edges, "4096", "8192", "131072", "134217728", "134221824", "2093056", "2097152", "3145728"))
			if k == "json_size" && r.IntN(2) == 0 {
				v = strconv.FormatInt(hs-binSize+pick(r, []int64{-4096, 4096, -1, 1, hs}), 10)
			}
			cfg[k] = v
			desc = append(desc, "config."+k+"="+v)
		}
	case "references":
		ds := objs(m, "digests")
		d := ds[r.IntN(len(ds))]
		switch r.IntN(7) {
		case 0:
			d["keyslots"] = append(d["keyslots"].([]any), pick(r, []any{"7", "31", "2", "3"}))
			desc = append(desc, "digest names extra keyslot")
		case 1:
			d["segments"] = append(d["segments"].([]any), pick(r, []any{"1", "2"}))
			desc = append(desc, "digest names missing segment")
		case 2:
			if l := d["keyslots"].([]any); len(l) > 0 {
				d["keyslots"] = l[1:]
			}
			desc = append(desc, "keyslot without digest")
		case 3:
			dd := clone(d)
			m["digests"].(doc)["1"] = dd
			desc = append(desc, "keyslot in two digests")
		case 4:
			d["segments"] = []any{}
			desc = append(desc, "digest covers no segment")
		case 5:
			d["keyslots"] = []any{}
			desc = append(desc, "digest with no keyslot")
		case 6:
			d[pick(r, []string{"keyslots", "segments"})] = pick(r, []any{[]any{json.Number("0")}, "0", []any{"0", "0"}, []any{"-1"}, []any{"00"}})
			desc = append(desc, "digest reference of wrong shape")
		}
	case "segments":
		s := objs(m, "segments")[0]
		switch r.IntN(9) {
		case 0:
			delete(s, pick(r, []string{"iv_tweak", "encryption", "sector_size", "offset", "size", "type"}))
			desc = append(desc, "segment field removed")
		case 1:
			s["flags"] = pick(r, []any{"x", []any{json.Number("1")}, []any{"a", "b"}, doc{}, []any{}})
			desc = append(desc, "segment flags")
		case 2:
			s["type"] = pick(r, []any{"linear", "crypt ", "CRYPT", json.Number("1")})
			desc = append(desc, "segment type")
		case 3:
			s["sector_size"] = json.Number(pick(r, []string{"0", "256", "1024", "2048", "8192", "4096", "513", "-512"}))
			desc = append(desc, "segment sector_size")
		case 4:
			s["offset"] = pick(r, append(edges, "16777216", "16777217", "32768", "0"))
			desc = append(desc, "segment offset")
		case 5:
			s["size"] = pick(r, []any{"dynamic", "0", "512", "513", "1048576", "Dynamic", json.Number("512"), "-1", "18446744073709551615"})
			desc = append(desc, "segment size")
		case 6:
			s["encryption"] = pick(r, []any{"cipher_null-ecb", "aes-xts-plain64", "aes-cbc-plain", "aes-ecb", "serpent-xts-plain64", "", "aes-xts-plain64-", json.Number("1")})
			desc = append(desc, "segment encryption")
		case 7:
			s["iv_tweak"] = pick(r, []any{"1", "-1", "18446744073709551615", "18446744073709551616", json.Number("0"), "x"})
			desc = append(desc, "segment iv_tweak")
		case 8:
			s["integrity"] = doc{"type": "hmac(sha256)", "journal_encryption": "none", "journal_integrity": "none"}
			desc = append(desc, "segment integrity")
		}
	case "tokens":
		t, _ := m["tokens"].(doc)
		id := pick(r, []string{"0", "1", "31", "32", "-1", "x"})
		switch r.IntN(6) {
		case 0:
			t[id] = pick(r, []any{"x", []any{}, json.Number("1"), nil})
		case 1:
			t[id] = doc{"keyslots": []any{"0"}}
		case 2:
			t[id] = doc{"type": "t", "keyslots": pick(r, []any{"0", []any{json.Number("0")}, []any{"9"}, []any{"0", "0"}, nil})}
		case 3:
			t[id] = doc{"type": pick(r, []any{json.Number("1"), "", "luks2-keyring"}), "keyslots": []any{"0"}}
		case 4:
			t[id] = doc{"type": "t", "keyslots": []any{}}
		case 5:
			t[id] = doc{"type": "t", "keyslots": []any{"0"}, "x": json.Number("1")}
		}
		desc = append(desc, "token "+id)
	case "kdf":
		ks := objs(m, "keyslots")
		k := ks[r.IntN(len(ks))]
		kdf := k["kdf"].(doc)
		f := pick(r, []string{"type", "hash", "iterations", "time", "memory", "cpus", "salt"})
		switch f {
		case "type":
			kdf[f] = pick(r, []any{"pbkdf2", "argon2i", "argon2id", "argon2d", "scrypt", ""})
		case "hash":
			kdf[f] = pick(r, []any{"sha1", "sha512", "md5", "whirlpool", "", "SHA256"})
		case "salt":
			kdf[f] = pick(r, []any{"", "AA==", "!!", json.Number("1")})
		default:
			kdf[f] = json.Number(pick(r, edges))
		}
		if r.IntN(4) == 0 {
			d := objs(m, "digests")[0]
			d["iterations"] = json.Number(pick(r, edges))
			f += "+digest iterations"
		}
		desc = append(desc, "kdf "+f)
	case "integers":
		paths := numericPaths(m, "")
		if len(paths) == 0 {
			return Case{}, false
		}
		p := pick(r, paths)
		v := pick(r, edges)
		var nv any = json.Number(v)
		if r.IntN(2) == 0 {
			nv = v
		}
		if r.IntN(8) == 0 {
			nv = pick(r, []any{json.Number("1.5"), json.Number("1e3"), "01", " 1", "0x10", "1.0"})
		}
		setPath(m, p, nv)
		desc = append(desc, p+"="+fmt.Sprint(nv))
	case "generic":
		paths := allPaths(m, "")
		p := pick(r, paths)
		if r.IntN(2) == 0 {
			delPath(m, p)
			desc = append(desc, "remove "+p)
		} else {
			nv := pick(r, []any{nil, "x", json.Number("1"), []any{}, doc{}, true})
			setPath(m, p, nv)
			desc = append(desc, fmt.Sprintf("%s=%v", p, nv))
		}
	case "binary":
		copies = pick(r, [][]int64{{0}, {hs}, {0, hs}})
		for _, off := range copies {
			bin := img[off : off+binSize]
			switch f := r.IntN(10); f {
			case 0:
				v := pick(r, []uint64{0, 4096, 8192, uint64(hs) * 2, uint64(hs) / 2, uint64(hs) + 512, 1 << 63, 8 << 20})
				binary.BigEndian.PutUint64(bin[offHdrSize:], v)
				desc = append(desc, fmt.Sprintf("hdr_size=%d@%d", v, off))
			case 1:
				v := pick(r, []uint64{0, 1, 2, 1 << 63, ^uint64(0)})
				binary.BigEndian.PutUint64(bin[offSeqID:], v)
				desc = append(desc, fmt.Sprintf("seqid=%d@%d", v, off))
			case 2:
				v := pick(r, []uint64{0, uint64(hs), 16384, 1 << 20, ^uint64(0)})
				binary.BigEndian.PutUint64(bin[offHdrOff:], v)
				desc = append(desc, fmt.Sprintf("hdr_offset=%d@%d", v, off))
			case 3:
				v := pick(r, []string{"sha1", "sha512", "", "SHA256", "sha256x", "crc32"})
				clear(bin[offCsumAlg : offCsumAlg+32])
				copy(bin[offCsumAlg:], v)
				desc = append(desc, "csum_alg="+v+"@"+strconv.FormatInt(off, 10))
			case 4:
				v := pick(r, []string{primaryMagic, secondMagic, "LUKS\xba\xbf", "\x00\x00\x00\x00\x00\x00"})
				copy(bin[offMagic:], v)
				desc = append(desc, fmt.Sprintf("magic %q@%d", v, off))
			case 5:
				v := pick(r, []uint16{0, 1, 3, 0xffff})
				binary.BigEndian.PutUint16(bin[offVersion:], v)
				desc = append(desc, fmt.Sprintf("version=%d@%d", v, off))
			case 6:
				v := pick(r, []string{"", "x", strings.Repeat("L", 48), "a\x00b", "\xff\xfe"})
				clear(bin[offLabel : offLabel+48])
				copy(bin[offLabel:], v)
				desc = append(desc, fmt.Sprintf("label %q@%d", v, off))
			case 7:
				v := pick(r, []string{"", "not-a-uuid", "D4627FB1-C70E-4C80-B651-6C58FD3EB1E4", strings.Repeat("a", 40), "00000000-0000-0000-0000-000000000000"})
				clear(bin[offUUID : offUUID+40])
				copy(bin[offUUID:], v)
				desc = append(desc, fmt.Sprintf("uuid %q@%d", v, off))
			case 8:
				v := pick(r, []string{"", strings.Repeat("s", 48), "x"})
				clear(bin[offSubsys : offSubsys+48])
				copy(bin[offSubsys:], v)
				desc = append(desc, fmt.Sprintf("subsystem %q@%d", v, off))
			case 9:
				bin[offSalt+r.IntN(64)] ^= 0xff
				desc = append(desc, fmt.Sprintf("salt byte@%d", off))
			}
		}
		rawDone = true
		if r.IntN(8) == 0 { // a stale checksum now and then
			c.Desc = strings.Join(desc, "; ") + "; checksum not fixed"
			c.Image = img
			return c, true
		}
	}
	if !rawDone {
		js, err := json.Marshal(m)
		if err != nil || !setJSON(js) {
			return Case{}, false
		}
	}
	for _, off := range []int64{0, hs} {
		Reseal(img, off)
	}
	c.Desc = strings.Join(desc, "; ")
	if len(copies) == 1 {
		c.Desc += fmt.Sprintf(" (copy at %d only)", copies[0])
	}
	c.Image = img
	return c, true
}

func pick[T any](r *rand.Rand, l []T) T { return l[r.IntN(len(l))] }

// objs returns the objects of section sec in id order.
func objs(m doc, sec string) []doc {
	s, _ := m[sec].(doc)
	keys := make([]string, 0, len(s))
	for k := range s {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var out []doc
	for _, k := range keys {
		if o, ok := s[k].(doc); ok {
			out = append(out, o)
		}
	}
	return out
}

func clone(d doc) doc {
	b, _ := json.Marshal(d)
	var out doc
	_ = decode(b, &out)
	return out
}

// allPaths lists every member path ("a/b/c") in m, sorted.
func allPaths(v any, prefix string) []string {
	var out []string
	if o, ok := v.(doc); ok {
		for k, x := range o {
			p := prefix + "/" + k
			out = append(out, p)
			out = append(out, allPaths(x, p)...)
		}
	}
	sort.Strings(out)
	return out
}

// numericPaths lists paths whose value is a number or a decimal string.
func numericPaths(v any, prefix string) []string {
	var out []string
	for _, p := range allPaths(v, prefix) {
		x := getPath(v.(doc), p)
		switch y := x.(type) {
		case json.Number:
			out = append(out, p)
		case string:
			if _, err := strconv.ParseUint(y, 10, 64); err == nil {
				out = append(out, p)
			}
		}
	}
	return out
}

func getPath(m doc, p string) any {
	var cur any = m
	for _, k := range strings.Split(p[1:], "/") {
		o, ok := cur.(doc)
		if !ok {
			return nil
		}
		cur = o[k]
	}
	return cur
}

func setPath(m doc, p string, v any) {
	parts := strings.Split(p[1:], "/")
	parent, ok := getPath(m, "/"+strings.Join(parts[:len(parts)-1], "/")).(doc)
	if len(parts) == 1 {
		parent, ok = m, true
	}
	if ok {
		parent[parts[len(parts)-1]] = v
	}
}

func delPath(m doc, p string) {
	parts := strings.Split(p[1:], "/")
	parent, ok := getPath(m, "/"+strings.Join(parts[:len(parts)-1], "/")).(doc)
	if len(parts) == 1 {
		parent, ok = m, true
	}
	if ok {
		delete(parent, parts[len(parts)-1])
	}
}
