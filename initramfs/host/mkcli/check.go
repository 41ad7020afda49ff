package mkcli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/unlockrd/unlockrd/unlock/luks2"
	"github.com/unlockrd/unlockrd/unlock/secret"
)

// maxKeyFile bounds what --key-file reads: a key server key is at most a
// few hundred bytes, and a wrong path (a disk, say) must not be read whole.
const maxKeyFile = 1 << 20

// checkOptions are the flags of `mkunlockrd check`.
type checkOptions struct {
	// UUID, when set, is checked as a UUID= device reference would be.
	UUID string
	// KeyFile, when set, is tried on the keyslots the boot would try.
	KeyFile string
}

// check reads each volume's LUKS2 header exactly as the boot does
// (ReadHeader with its secondary-copy fallback, the default policy,
// SlotOrder, Unseal with its digest check) and says what the boot would do.
// Everything is opened read-only; no mapping is created.
func check(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := newFlags("check", "[--uuid U] [--key-file F] DEVICE|FILE...", stderr)
	var o checkOptions
	fs.StringVar(&o.UUID, "uuid", "", "check the volume as a `UUID`= device reference would (the header's UUID must match)")
	fs.StringVar(&o.KeyFile, "key-file", "", "say whether the key in this `file` (the raw key, as the key server serves it; - for stdin) opens the volume")
	paths, err := parse(fs, args, -1)
	if err != nil {
		return err
	}
	run := func(key []byte) error {
		failed := 0
		for _, p := range paths {
			if !checkVolume(ctx, p, o, key, stdout) {
				failed++
			}
		}
		if failed > 0 {
			return fmt.Errorf("check: %d of %d volume(s) refused or not opened", failed, len(paths))
		}
		return nil
	}
	if o.KeyFile == "" {
		return run(nil)
	}
	return withKeyFile(o.KeyFile, stdin, run)
}

// withKeyFile reads the key file (path "-": stdin) and calls fn with its
// bytes, which it wipes when fn returns, whatever fn did.
func withKeyFile(path string, stdin io.Reader, fn func(key []byte) error) error {
	key, err := readKeyFile(path, stdin)
	if err != nil {
		return err
	}
	defer clear(key)
	return fn(key)
}

// readKeyFile reads a key file whole. The caller must clear the result.
func readKeyFile(path string, stdin io.Reader) ([]byte, error) {
	r := stdin
	if path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("--key-file: %w", err)
		}
		defer f.Close()
		r = f
	}
	// One byte more than allowed, to tell "too big" from "exactly the limit".
	key, err := io.ReadAll(io.LimitReader(r, maxKeyFile+1))
	switch {
	case err != nil:
		clear(key)
		return nil, fmt.Errorf("--key-file %s: %w", path, err)
	case len(key) > maxKeyFile:
		clear(key)
		return nil, fmt.Errorf("--key-file %s: larger than %d bytes, not a key", path, maxKeyFile)
	case len(key) == 0:
		return nil, fmt.Errorf("--key-file %s: empty", path)
	}
	return key, nil
}

// checkVolume prints the verdict on one volume and reports whether it is
// accepted (and, with a key, opened by it).
func checkVolume(ctx context.Context, path string, o checkOptions, key []byte, w io.Writer) bool {
	// O_RDONLY: a check must never be able to write, even by mistake.
	f, err := os.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		fmt.Fprintf(w, "%s: refused: %v\n", path, err)
		return false
	}
	defer f.Close()
	h, err := luks2.ReadHeader(f)
	if err != nil {
		fmt.Fprintf(w, "%s: refused, the boot would try no key on it:\n", path)
		printReasons(w, err)
		if size, serr := f.Seek(0, io.SeekEnd); serr == nil && luks2.Unfinished(f, size, luks2.FormatOptions{}) == nil {
			fmt.Fprintf(w, "  (an unfinished unlockrd format: only the marker of an interrupted first-boot format is there, no volume)\n")
		}
		return false
	}
	pol := luks2.DefaultPolicy()
	pol.UUID = o.UUID
	if err := pol.Validate(h); err != nil {
		fmt.Fprintf(w, "%s: refused, the boot would try no key on it:\n", path)
		printReasons(w, err)
		if h.Secondary {
			fmt.Fprintf(w, "  (primary header copy damaged: %v; this is the secondary copy)\n", h.PrimaryErr)
		}
		return false
	}
	printAccepted(w, path, h, o)
	if key == nil {
		return true
	}
	return tryKey(ctx, w, path, f, h, key, o.KeyFile)
}

// printReasons prints each reason of a refusal on its own line.
func printReasons(w io.Writer, err error) {
	for _, r := range reasons(err) {
		fmt.Fprintf(w, "  %s\n", r)
	}
}

// reasons flattens joined errors (errors.Join) into their messages.
func reasons(err error) []string {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		var out []string
		for _, e := range j.Unwrap() {
			out = append(out, reasons(e)...)
		}
		return out
	}
	return strings.Split(err.Error(), "\n")
}

func printAccepted(w io.Writer, path string, h *luks2.Header, o checkOptions) {
	fmt.Fprintf(w, "%s: accepted\n", path)
	uuid := h.UUID
	if o.UUID != "" {
		uuid += " (matches UUID=" + o.UUID + ")"
	}
	fmt.Fprintf(w, "  uuid      %s\n", uuid)
	if h.Label != "" {
		fmt.Fprintf(w, "  label     %s\n", h.Label)
	}
	if h.Secondary {
		fmt.Fprintf(w, "  header    primary copy damaged (%v): the boot uses the intact secondary copy\n", h.PrimaryErr)
	}
	for _, s := range h.Segments {
		fmt.Fprintf(w, "  segment   %d: cipher %s, sector size %d, data at offset %d, size %s\n",
			s.ID, s.Encryption, s.SectorSize, s.Offset, s.Size)
	}
	if len(h.Flags) > 0 {
		fmt.Fprintf(w, "  flags     %s (reported, never applied)\n", strings.Join(h.Flags, " "))
	}
	fmt.Fprintf(w, "  keyslots  the boot tries, in this order:\n")
	for i, id := range h.SlotOrder() {
		k, _ := h.Keyslot(id)
		prio := ""
		if k.Priority == 2 {
			prio = ", high priority"
		}
		fmt.Fprintf(w, "    %d. keyslot %d: %s, %d-bit volume key%s\n", i+1, id, kdfCost(k.KDF), k.KeySize*8, prio)
	}
	for _, k := range h.Keyslots {
		if k.Priority == 0 {
			fmt.Fprintf(w, "    keyslot %d: priority 0 (ignore), never tried\n", k.ID)
		}
	}
}

// kdfCost says what a keyslot's KDF costs the boot.
func kdfCost(k luks2.KDF) string {
	if k.Type == "pbkdf2" {
		return fmt.Sprintf("pbkdf2 %s, %d iterations", k.Hash, k.Iterations)
	}
	return fmt.Sprintf("%s, %d passes, %d KiB memory, %d lanes", k.Type, k.Time, k.Memory, k.CPUs)
}

// tryKey runs the boot's keyslot code (Unseal, which also checks the
// digest) over the keyslots in the boot's order, and wipes every volume key
// it gets.
func tryKey(ctx context.Context, w io.Writer, path string, r io.ReaderAt, h *luks2.Header, key []byte, keyFile string) bool {
	var errs []error
	for _, slot := range h.SlotOrder() {
		if err := ctx.Err(); err != nil {
			fmt.Fprintf(w, "%s: key file %s: %v\n", path, keyFile, err)
			return false
		}
		// The boot's own keyslot code: the same KDF, AF merge and digest
		// check. The passphrase stays the caller's to wipe.
		vk, err := luks2.Unseal(ctx, r, h, slot, secret.From(key))
		if vk != nil {
			vk.Wipe()
		}
		if errors.Is(err, luks2.ErrWrongKey) {
			continue
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		fmt.Fprintf(w, "%s: key file %s opens keyslot %d (digest verified; no mapping created)\n", path, keyFile, slot)
		return true
	}
	fmt.Fprintf(w, "%s: key file %s opens none of the %d keyslot(s) the boot tries\n", path, keyFile, len(h.SlotOrder()))
	for _, e := range errs {
		fmt.Fprintf(w, "  %v\n", e)
	}
	return false
}
