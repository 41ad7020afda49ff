package luksdiff

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"sync"
	"testing"

	"github.com/unlockrd/unlockrd/unlock/luks2"
)

// allowed are our deliberate refusals of headers cryptsetup opens
// (docs/DESIGN.md §6 lists them with the reasons). A refusal whose reason
// matches none of these is a test failure.
var allowed = []struct {
	re  *regexp.Regexp
	why string
}{
	{regexp.MustCompile(`only "crypt" is allowed`), "crypt segments only"},
	{regexp.MustCompile(`cipher .* is not (on the allow-list|supported for keyslots)`), "cipher allow-list"},
	{regexp.MustCompile(`bit key, at least`), "minimum key size"},
	{regexp.MustCompile(`area key of`), "keyslot area key size must fit its cipher"},
	{regexp.MustCompile(`pbkdf2 with hash|iterations|out of bounds|KDF "`), "KDF bounds"},
	{regexp.MustCompile(`digest \d+ (type|hash)`), "digest must be pbkdf2 with a hash we implement"},
	{regexp.MustCompile(`anti-forensic splitter`), "AF splitter as cryptsetup writes it"},
	{regexp.MustCompile(`exactly one \(segment 0\)`), "single data segment"},
	{regexp.MustCompile(`dm-integrity`), "no dm-integrity"},
	{regexp.MustCompile(`sector size \d+`), "sector size"},
	{regexp.MustCompile(`priority -?\d+`), "priority 0..2"},
	{regexp.MustCompile(`no usable keyslot`), "a header with nothing to try is refused early"},
	{regexp.MustCompile(`size "\d+"|not sector aligned`), "fixed-size segments must be sector multiples"},
	{regexp.MustCompile(`has type "`), "luks2 keyslots only"},
	{regexp.MustCompile(`area type`), "raw keyslot areas only"},
	{regexp.MustCompile(`empty KDF salt`), "KDF salt"},
	{regexp.MustCompile(`beyond the end`), "segment beyond the device"},
	{regexp.MustCompile(`too small for \d+ bytes of split key material`), "keyslot area must hold its split key"},
	{regexp.MustCompile(`JSON metadata: json: cannot unmarshal`), "fields the unlocker uses must have their LUKS2 JSON types and ranges"},
	{regexp.MustCompile(`is not base64`), "salts and digests must be base64"},
	{regexp.MustCompile(`is not a byte count`), "offsets and sizes below 2^63"},
	{regexp.MustCompile(`kdf type`), "KDF pbkdf2, argon2i or argon2id (cryptsetup checks the type only when opening)"},
	{regexp.MustCompile(`holds a \d+-byte key`), "volume keys of at most 512 bytes"},
	{regexp.MustCompile(`"0\d+" is not a decimal integer`), "decimal strings without leading zeros (one spelling per value)"},
	{regexp.MustCompile(`unsupported header checksum "SHA256"`), "the header checksum spelled sha256, as cryptsetup writes it"},
	{regexp.MustCompile(`is not a 32-bit integer`), "JSON integers within 32 bits (json-c saturates larger ones)"},
}

func allowedReason(err error) (string, bool) {
	for _, a := range allowed {
		if a.re.MatchString(err.Error()) {
			return a.why, true
		}
	}
	return "", false
}

// sparse reads a case as the file cryptsetup sees: the image, then zeroes.
type sparse struct {
	b    []byte
	size int64
}

func (s sparse) ReadAt(p []byte, off int64) (int, error) {
	if off >= s.size {
		return 0, io.EOF
	}
	n := 0
	for n < len(p) && off+int64(n) < s.size {
		i := off + int64(n)
		if i < int64(len(s.b)) {
			n += copy(p[n:], s.b[i:])
		} else {
			p[n] = 0
			n++
		}
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func ours(c Case) error {
	h, err := luks2.ReadHeader(sparse{c.Image, c.FileSize})
	if err != nil {
		return err
	}
	return luks2.DefaultPolicy().Validate(h)
}

func cacheDir(t testing.TB) string {
	if d := os.Getenv("LUKSDIFF_CACHE"); d != "" {
		return d
	}
	d, err := os.UserCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(d, "unlockrd", "luksdiff")
}

// TestDifferential runs the generated corpus through our reader and policy
// and through cryptsetup: any header cryptsetup rejects and we accept is a
// failure, and so is any it accepts that we refuse for a reason not on the
// allow-list. LUKSDIFF_N sets the corpus size (make fuzz runs more).
func TestDifferential(t *testing.T) {
	if testing.Short() {
		t.Skip("runs cryptsetup thousands of times")
	}
	if _, err := exec.LookPath("cryptsetup"); err != nil {
		t.Fatalf("cryptsetup is needed: %v", err)
	}
	n, seed := 2500, uint64(14)
	if v := os.Getenv("LUKSDIFF_N"); v != "" {
		n, _ = strconv.Atoi(v)
	}
	if v := os.Getenv("LUKSDIFF_SEED"); v != "" {
		seed, _ = strconv.ParseUint(v, 10, 64)
	}
	cache := cacheDir(t)
	bases, err := MakeBases(filepath.Join(cache, "bases"), Specs())
	if err != nil {
		t.Fatal(err)
	}
	cases := Generate(bases, n, seed)
	tmp := t.TempDir()

	type result struct {
		c       Case
		theirs  bool
		oursErr error
		runErr  error
	}
	results := make([]result, len(cases))
	var wg sync.WaitGroup
	work := make(chan int)
	for range runtime.NumCPU() {
		wg.Go(func() {
			for i := range work {
				ok, err := CryptsetupVerdict(cases[i], tmp, filepath.Join(cache, "verdicts"))
				results[i] = result{c: cases[i], theirs: ok, oursErr: ours(cases[i]), runErr: err}
			}
		})
	}
	for i := range cases {
		work <- i
	}
	close(work)
	wg.Wait()

	type count struct{ n, theirAccept, ourAccept, allowed int }
	counts := map[string]*count{}
	bad := 0
	for _, r := range results {
		if r.runErr != nil {
			t.Fatalf("cryptsetup: %v", r.runErr)
		}
		k := counts[r.c.Class]
		if k == nil {
			k = &count{}
			counts[r.c.Class] = k
		}
		k.n++
		if r.theirs {
			k.theirAccept++
		}
		if r.oursErr == nil {
			k.ourAccept++
		}
		switch {
		case !r.theirs && r.oursErr == nil:
			bad++
			if d := os.Getenv("LUKSDIFF_DUMP"); d != "" {
				_ = r.c.WriteFile(filepath.Join(d, r.c.Hash()[:12]+".img"))
			}
			if bad <= 40 {
				t.Errorf("cryptsetup rejects, we accept: %s %s: %s [%s]", r.c.Base, r.c.Class, r.c.Desc, r.c.Hash()[:12])
			}
		case r.theirs && r.oursErr != nil:
			if !errors.Is(r.oursErr, luks2.ErrRefused) {
				t.Errorf("%s %s: %s: error without ErrRefused: %v", r.c.Base, r.c.Class, r.c.Desc, r.oursErr)
			}
			if why, ok := allowedReason(r.oursErr); ok {
				_ = why
				k.allowed++
			} else {
				bad++
				if bad <= 40 {
					t.Errorf("cryptsetup accepts, we refuse (not on the allow-list): %s %s: %s: %v", r.c.Base, r.c.Class, r.c.Desc, r.oursErr)
				}
			}
		}
	}
	line := fmt.Sprintf("%d cases:", len(results))
	for _, cl := range append([]string{"base"}, Classes...) {
		if k := counts[cl]; k != nil {
			line += fmt.Sprintf(" %s=%d (cryptsetup accepts %d, we accept %d, allowed refusals %d);", cl, k.n, k.theirAccept, k.ourAccept, k.allowed)
		}
	}
	t.Log(line)
	if bad > 0 {
		t.Fatalf("%d differences", bad)
	}
}
