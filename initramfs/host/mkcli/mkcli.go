// Package mkcli is the mkunlockrd command line (DESIGN §7), kept out of
// package main so that cmd/mkunlockrd is wiring only:
//
//	mkunlockrd build -c unlockrd.yaml -m /lib/modules/<release> -o initramfs.img
//	mkunlockrd ls initramfs.img
//	mkunlockrd pin CERT.pem|HOST:PORT
//	mkunlockrd netboot -c unlockrd.yaml -k vmlinuz -m /lib/modules/<release> -o DIR
//	mkunlockrd check [--uuid U] [--key-file F] DEVICE|FILE...
//
// It wires flags to initramfs/host/image, netboot/host/pxe, unlock/pin and
// the LUKS2 reader. It runs on the build or admin host only.
package mkcli

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/host/cliflag"
	"github.com/unlockrd/unlockrd/initramfs/host/image"
	"github.com/unlockrd/unlockrd/initramfs/layout"
	"github.com/unlockrd/unlockrd/netboot/host/pxe"
	"github.com/unlockrd/unlockrd/unlock/pin"
)

const usage = `usage: mkunlockrd COMMAND [flags]

commands:
  build    -c unlockrd.yaml -m /lib/modules/<release> -o initramfs.img
           [--init PATH] [--compress xz|zstd|gzip|none]
  netboot  -c unlockrd.yaml -k vmlinuz -m /lib/modules/<release> -o DIR
           [--append "KERNEL ARGS"] [--init PATH] [--compress ...]
           writes DIR/vmlinuz, DIR/initramfs.img and DIR/boot.ipxe
  ls       IMAGE                  list an image and print its configuration
  pin      CERT.pem|HOST:PORT     print a certificate's pin (sha256//...)
  check    [--uuid U] [--key-file F] DEVICE|FILE...
           read LUKS2 headers as the boot will and say what it would do
           (exit 0 accepted, 1 refused or the key opens no keyslot); read-only

Images are zstd-compressed by default (the kernel unpacks it fastest; no
external program needed); --compress xz makes the smallest image (about
-20%; needs the xz program, package xz-utils) for slow transfers like TFTP.

Run "mkunlockrd COMMAND -h" for a command's flags.
`

// Main runs the command line args (without the program name) and returns
// the exit status: 0 done, 1 failed, 2 bad usage. stdin is read only by
// `check --key-file -`.
func Main(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "build":
		err = build(ctx, args[1:], stdout, stderr)
	case "ls":
		err = ls(args[1:], stdout, stderr)
	case "pin":
		err = pinCmd(ctx, args[1:], stdout, stderr)
	case "netboot":
		err = netboot(ctx, args[1:], stdout, stderr)
	case "check":
		err = check(ctx, args[1:], stdin, stdout, stderr)
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "mkunlockrd: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	// Usage errors and help were printed where they arose, with the
	// command's own usage.
	code := cliflag.Status(err)
	if code == 1 {
		fmt.Fprintf(stderr, "mkunlockrd: %v\n", err)
	}
	return code
}

// newFlags returns a command's flag set; it prints its errors and the
// command's usage to stderr itself.
func newFlags(name, synopsis string, stderr io.Writer) *flag.FlagSet {
	fs := cliflag.NewFlagSet(name, stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: mkunlockrd %s %s\n", name, synopsis)
		hasFlags := false
		fs.VisitAll(func(*flag.Flag) { hasFlags = true })
		if hasFlags {
			fmt.Fprintln(stderr, "\nflags:")
			fs.PrintDefaults()
		}
	}
	return fs
}

// parse parses flags and checks the number of positional arguments
// (positional < 0: at least one), which it returns.
func parse(fs *flag.FlagSet, args []string, positional int) ([]string, error) {
	pos, err := cliflag.Parse(fs, args)
	if err != nil {
		// The flag set printed the message and the usage.
		return nil, err
	}
	if (positional >= 0 && len(pos) != positional) || (positional < 0 && len(pos) == 0) {
		want := fmt.Sprint(positional)
		if positional < 0 {
			want = "at least 1"
		}
		fmt.Fprintf(fs.Output(), "mkunlockrd %s: want %s argument(s), got %d\n", fs.Name(), want, len(pos))
		fs.Usage()
		return nil, cliflag.ErrUsage
	}
	return pos, nil
}

// buildFlags are the flags build and netboot share.
type buildFlags struct {
	cfg, mods, initPath, comp string
	mke2fs                    string
	testFaults                bool
}

func (b *buildFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&b.cfg, "c", "", "configuration `file` (YAML, DESIGN §3)")
	fs.StringVar(&b.cfg, "config", "", "same as -c `file`")
	fs.StringVar(&b.mods, "m", "", "kernel module `tree` (/lib/modules/<release>)")
	fs.StringVar(&b.mods, "modules", "", "same as -m `tree`")
	fs.StringVar(&b.initPath, "init", "", "unlockrd-init `binary` (default: unlockrd-init beside mkunlockrd)")
	fs.StringVar(&b.comp, "compress", string(image.DefaultCompression),
		"image compression: zstd (unpacks fastest), xz (smallest; needs the xz program), gzip or none")
	fs.StringVar(&b.mke2fs, "mke2fs", "", "mke2fs `binary` carried (with its libraries) when a volume says provision (default /usr/sbin/mke2fs)")
	fs.BoolVar(&b.testFaults, "test-faults", false, "TESTS ONLY: honour rd.unlockrd.test-poweroff-at= (power off at a write step)")
}

// options turns the flags into build options.
func (b *buildFlags) options(stderr io.Writer) (image.Options, error) {
	c, err := image.ParseCompression(b.comp)
	if err != nil {
		return image.Options{}, err
	}
	if b.initPath == "" {
		if b.initPath, err = initBeside(); err != nil {
			return image.Options{}, err
		}
	}
	epoch, err := image.ParseSourceDateEpoch(os.Getenv("SOURCE_DATE_EPOCH"))
	if err != nil {
		return image.Options{}, err
	}
	return image.Options{
		ConfigFile:  b.cfg,
		ModulesDir:  b.mods,
		Init:        b.initPath,
		Compression: c,
		MTime:       epoch,
		Logger:      log.New(stderr, "mkunlockrd: ", 0),
		Mke2fs:      b.mke2fs,
		TestFaults:  b.testFaults,
	}, nil
}

func build(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("build", "-c unlockrd.yaml -m /lib/modules/<release> -o initramfs.img [--init PATH] [--compress xz|zstd|gzip|none]", stderr)
	var bf buildFlags
	var out string
	bf.register(fs)
	fs.StringVar(&out, "o", "", "image `file` to write")
	fs.StringVar(&out, "output", "", "same as -o `file`")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	if bf.cfg == "" || bf.mods == "" || out == "" {
		fmt.Fprintln(stderr, "mkunlockrd build: -c, -m and -o are required")
		fs.Usage()
		return cliflag.ErrUsage
	}
	o, err := bf.options(stderr)
	if err != nil {
		return err
	}
	o.Output = out
	start := time.Now()
	rep, err := image.Build(ctx, o)
	if err != nil {
		return err
	}
	printReport(stdout, rep, o.Init, time.Since(start))
	return nil
}

// initBeside finds unlockrd-init next to the running executable, through
// symbolic links (a packaged /usr/bin/mkunlockrd may link to
// /usr/lib/unlockrd/mkunlockrd): a build needs no Go toolchain.
func initBeside() (string, error) {
	exe, err := os.Executable()
	if err == nil {
		exe, err = filepath.EvalSymlinks(exe)
	}
	if err != nil {
		return "", fmt.Errorf("no init binary: cannot locate mkunlockrd's own executable (%v); pass --init PATH", err)
	}
	p := filepath.Join(filepath.Dir(exe), "unlockrd-init")
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("no init binary: %s does not exist; pass --init PATH or install unlockrd-init beside mkunlockrd (make build puts both in bin/)", p)
	}
	return p, nil
}

func printReport(w io.Writer, r *image.Report, initPath string, took time.Duration) {
	optional := 0
	for _, m := range r.Modules {
		if m.Optional {
			optional++
		}
	}
	comp := string(r.Compression)
	if r.Compressor != "" {
		// "xz (XZ Utils) 5.4.1": the bytes depend on its version.
		comp = r.Compressor
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "init\t%s\t  %s\n", image.FormatSize(r.InitSize), initPath)
	fmt.Fprintf(tw, "modules\t%s\t  %d modules (%d optional) for %s\n", image.FormatSize(r.ModulesSize), len(r.Modules), optional, r.Release)
	fmt.Fprintf(tw, "config\t%s\t  \n", image.FormatSize(r.ConfigSize))
	fmt.Fprintf(tw, "uncompressed\t%s\t  cpio archive\n", image.FormatSize(r.Uncompressed))
	fmt.Fprintf(tw, "image\t%s\t  %s, %s\n", image.FormatSize(r.Compressed), comp, r.Output)
	tw.Flush()
	if len(r.Modules) > 0 {
		names := make([]string, len(r.Modules))
		for i, m := range r.Modules {
			names[i] = m.Name
			if m.Optional {
				names[i] += "?"
			}
		}
		fmt.Fprintf(w, "load order (? = optional): %s\n", strings.Join(names, " "))
	}
	fmt.Fprintf(w, "built in %.2fs\n", took.Seconds())
}

func ls(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("ls", "IMAGE", stderr)
	pos, err := parse(fs, args, 1)
	if err != nil {
		return err
	}
	c, err := image.ReadFile(pos[0])
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 1, ' ', 0)
	for _, e := range c.Entries {
		size := fmt.Sprint(e.Size)
		if e.Mode&os.ModeDevice != 0 {
			size = fmt.Sprintf("%d,%d", e.Major, e.Minor)
		}
		fmt.Fprintf(tw, "%s\t%10s\t%s\n", e.ModeString(), size, e.Name)
	}
	tw.Flush()
	fmt.Fprintf(stdout, "\n%d entries, %s cpio, %s compression", len(c.Entries), image.FormatSize(c.Uncompressed), c.Compression)
	if c.Release != "" {
		fmt.Fprintf(stdout, ", %d modules for %s", len(c.Modules), c.Release)
	}
	fmt.Fprintln(stdout)
	if c.Config == nil {
		return fmt.Errorf("%s: no configuration at /%s: not an unlockrd image", pos[0], layout.ConfigPath)
	}
	fmt.Fprintf(stdout, "\n/%s:\n%s", layout.ConfigPath, c.Config)
	return nil
}

func pinCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("pin", "CERT.pem|HOST:PORT", stderr)
	timeout := fs.Duration("timeout", 10*time.Second, "for HOST:PORT, how long to wait for the TLS handshake")
	pos, err := parse(fs, args, 1)
	if err != nil {
		return err
	}
	arg := pos[0]
	if data, err := os.ReadFile(arg); err == nil {
		p, err := pin.FromPEM(data)
		if err != nil {
			return fmt.Errorf("%s: %w", arg, err)
		}
		fmt.Fprintln(stdout, p)
		return nil
	} else if _, _, splitErr := net.SplitHostPort(arg); splitErr != nil {
		return fmt.Errorf("%s: neither a readable PEM file (%v) nor HOST:PORT", arg, err)
	}
	return pinRemote(ctx, arg, *timeout, stdout, stderr)
}

// pinRemote prints the pin of the leaf certificate a TLS server presents.
// Nothing is verified: the point is to learn the key, which the operator
// must then check by other means. The pin alone goes to stdout, for
// scripts; what it is a pin of, and the chain's other pins (a pin on an
// issuing CA is also valid, DESIGN §5), go to stderr.
func pinRemote(ctx context.Context, addr string, timeout time.Duration, stdout, stderr io.Writer) error {
	host, _, _ := net.SplitHostPort(addr)
	d := tls.Dialer{
		NetDialer: &net.Dialer{Timeout: timeout},
		Config: &tls.Config{
			ServerName: host,
			// Only to read the certificate; nothing is sent over this
			// connection.
			InsecureSkipVerify: true,
		},
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("%s: %w", addr, err)
	}
	defer conn.Close()
	certs := conn.(*tls.Conn).ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return fmt.Errorf("%s: the server presented no certificate", addr)
	}
	fmt.Fprintln(stdout, pin.FromCert(certs[0]))
	fmt.Fprintf(stderr, "mkunlockrd: that is the pin of the leaf certificate's public key presented by %s (%s), read without verification: check it out of band\n",
		addr, certs[0].Subject)
	for _, c := range certs[1:] {
		fmt.Fprintf(stderr, "mkunlockrd: chain certificate %s: %s\n", c.Subject, pin.FromCert(c))
	}
	return nil
}

func netboot(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("netboot", `-c unlockrd.yaml -k vmlinuz -m /lib/modules/<release> -o DIR [--append "KERNEL ARGS"] [--init PATH] [--compress xz|zstd|gzip|none]`, stderr)
	var bf buildFlags
	var kernel, dir, appendArgs string
	bf.register(fs)
	fs.StringVar(&kernel, "k", "", "kernel `image` (bzImage) of the modules' release")
	fs.StringVar(&kernel, "kernel", "", "same as -k `image`")
	fs.StringVar(&dir, "o", "", "output `folder` for vmlinuz, initramfs.img and boot.ipxe (created if missing)")
	fs.StringVar(&dir, "output", "", "same as -o `folder`")
	fs.StringVar(&appendArgs, "append", "", "kernel command line `args` boot.ipxe passes; iPXE expands settings such as ${uuid} in them")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	if bf.cfg == "" || kernel == "" || bf.mods == "" || dir == "" {
		fmt.Fprintln(stderr, "mkunlockrd netboot: -c, -k, -m and -o are required")
		fs.Usage()
		return cliflag.ErrUsage
	}
	o, err := bf.options(stderr)
	if err != nil {
		return err
	}
	start := time.Now()
	rep, err := pxe.Write(ctx, pxe.Options{Options: o, Kernel: kernel, Dir: dir, Append: appendArgs})
	if err != nil {
		return err
	}
	printReport(stdout, rep.Report, o.Init, time.Since(start))
	fmt.Fprintf(stdout, "kernel %s (%s), script %s:\n  kernel %s %s\n",
		rep.Kernel, rep.KernelRelease, rep.Script, pxe.KernelFile, rep.Cmdline)
	return nil
}
