// Command demo boots Debian's stock kernel with an unlockrd image under
// QEMU, against a key server on this machine, and shows what happens: the
// stage lines of the initramfs and the report of the real root's init.
//
// It is what `make demo` runs. Everything it makes lives in a temporary
// folder that is removed at the end (-keep keeps it).
package main

import (
	"context"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/unlockrd/unlockrd/qemu-tests/harness"
)

func main() {
	var (
		keep    = flag.Bool("keep", false, "keep the work folder (disk, image, key server data, console log)")
		verbose = flag.Bool("v", false, "show the kernel's console output too")
		appendK = flag.String("append", "", "extra kernel command-line arguments")
		timeout = flag.Duration("timeout", 10*time.Minute, "give up after this long")
	)
	flag.Parse()
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	ctx, cancel2 := context.WithTimeout(ctx, *timeout)
	defer cancel2()
	if err := run(ctx, *keep, *verbose, strings.Fields(*appendK)); err != nil {
		fmt.Fprintf(os.Stderr, "\ndemo FAILED: %v\n", err)
		os.Exit(1)
	}
}

func say(format string, a ...any) { fmt.Printf("==> "+format+"\n", a...) }

func run(ctx context.Context, keep, verbose bool, extra []string) error {
	dir, err := os.MkdirTemp("", "unlockrd-demo-")
	if err != nil {
		return err
	}
	if keep {
		defer say("work folder kept: %s", dir)
	} else {
		defer os.RemoveAll(dir)
	}

	k, err := harness.Kernel()
	if err != nil {
		return err
	}
	hostID := uuid()
	say("building unlockrd-init, mkunlockrd and unlockrd-keyserver; creating the key server's TLS key and master key")
	e, err := harness.Enroll(ctx, dir, hostID)
	if err != nil {
		return err
	}
	bins, token, key := e.Bins, e.Token, e.Key
	say("enrolled host %s in %s (its token goes to the VM as an SMBIOS credential)", hostID, e.Data)

	say("building the VM disk: GPT with root (ext4), data (LUKS2 + ext4), swap (LUKS2)")
	fx, err := harness.NewFixture(ctx, dir, key)
	clear(key)
	if err != nil {
		return err
	}

	srv, err := e.Serve(ctx, prefixWriter("    keyserver | "))
	if err != nil {
		return err
	}
	defer srv.Stop()
	say("key server listening on https://%s (the VM reaches it as %s), pin %s", srv.Addr, harness.GuestHostIP, srv.Pin)

	cfg := harness.ImageConfig{URLs: []string{srv.GuestURL()}, Pins: []string{srv.Pin}}
	say("building the image for kernel %s with mkunlockrd; its configuration:\n%s", k.Release, indent(cfg.YAML()))
	img, err := harness.BuildImage(ctx, bins, cfg, dir)
	if err != nil {
		return err
	}
	st, _ := os.Stat(img)
	say("image: %s (%.2f MB)", img, float64(st.Size())/1e6)

	say("booting QEMU (TCG, no KVM): kernel %s", k.Vmlinuz)
	var console io.Writer = filterWriter{}
	if verbose {
		console = prefixWriter("    ")
	}
	vm, err := harness.Start(ctx, harness.VMOptions{
		Name:      "demo",
		Initramfs: img,
		Append:    append([]string{"quiet"}, extra...),
		Disks:     []harness.Drive{{Path: fx.Disk.Path}},
		UUID:      hostID,
		SMBIOS:    []string{harness.TokenCredential(token)},
		SerialLog: filepath.Join(dir, "console.log"),
	}, console)
	if err != nil {
		return err
	}
	defer vm.Kill()
	rep, err := vm.ExpectReport(8 * time.Minute)
	if err != nil {
		return fmt.Errorf("%w\n(last console lines:\n%s)", err, tail(vm, 15))
	}
	if err := vm.Wait(3 * time.Minute); err != nil {
		return err
	}

	say("the real root's init reported:")
	fmt.Printf("    PID of the real init:     %d\n", rep.PID)
	fmt.Printf("    root:                     %s\n", rep.Root)
	if m, ok := rep.Mount(harness.DataMountPoint); ok {
		fmt.Printf("    data volume:              %s on %s (%s)\n", m.Source, m.Target, m.FSType)
	}
	f := rep.Files[harness.HelloPath]
	fmt.Printf("    %s: %q (sha256 %s…)\n", harness.HelloPath, f.Content, f.SHA256[:min(12, len(f.SHA256))])
	fmt.Printf("    swap:                     %s\n", strings.Join(rep.Swaps, "; "))
	fmt.Printf("    initramfs removed:        %v\n", rep.InitramfsGone)

	var problems []string
	if rep.PID != 1 {
		problems = append(problems, "the real init is not PID 1")
	}
	if f.SHA256 != fx.HelloSHA256() {
		problems = append(problems, "the data file does not have the content written to the encrypted volume")
	}
	if len(rep.Swaps) == 0 {
		problems = append(problems, "no swap is active")
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	say("demo OK: the VM fetched its key over pinned HTTPS, unlocked data and swap, mounted them and switched root")
	return nil
}

// filterWriter shows only unlockrd's own lines (and the root's report).
type filterWriter struct{}

func (filterWriter) Write(p []byte) (int, error) {
	for _, l := range strings.Split(strings.TrimRight(string(p), "\n"), "\n") {
		if i := strings.Index(l, "unlockrd: "); i >= 0 {
			fmt.Println("    " + l[i:])
		}
	}
	return len(p), nil
}

type prefixWriter string

func (w prefixWriter) Write(p []byte) (int, error) {
	for _, l := range strings.Split(strings.TrimRight(string(p), "\n"), "\n") {
		fmt.Println(string(w) + l)
	}
	return len(p), nil
}

func indent(s string) string {
	return "    " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n    ")
}

func tail(vm *harness.VM, n int) string {
	ls := vm.Lines()
	if len(ls) > n {
		ls = ls[len(ls)-n:]
	}
	var b strings.Builder
	for _, l := range ls {
		b.WriteString("    " + l.Text + "\n")
	}
	return b.String()
}

func uuid() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
