// Package pxe writes netboot bundles (DESIGN §8): a kernel, the unlockrd
// image built for it and an iPXE script that loads both, ready to be served
// over HTTP or TFTP. Host-side: `mkunlockrd netboot` wiring calls Write.
package pxe

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/unlockrd/unlockrd/initramfs/host/image"
	"github.com/unlockrd/unlockrd/initramfs/host/kmod"
)

// Names of the files of a netboot bundle, in its folder.
const (
	KernelFile    = "vmlinuz"
	InitramfsFile = "initramfs.img"
	ScriptFile    = "boot.ipxe"
)

// Options are the inputs of Write: those of image.Build (its Output is
// ignored: the image goes into the bundle), plus the kernel.
type Options struct {
	image.Options
	// Kernel is the kernel image (a bzImage, /boot/vmlinuz-<release>).
	Kernel string
	// Dir is the bundle's folder; it is created if missing.
	Dir string
	// Append is the kernel command line the script passes. iPXE expands
	// settings in it (${uuid}, ${net0/mac}, ${hostname}): one bundle can
	// hand each host its own rd.unlockrd.host=.
	Append string
}

// Report describes a written bundle.
type Report struct {
	*image.Report
	// KernelRelease is the release the kernel image names.
	KernelRelease string
	// Kernel, Initramfs and Script are the paths of the bundle's files.
	Kernel, Initramfs, Script string
	// Cmdline is the kernel command line in the script.
	Cmdline string
}

// Write writes a netboot bundle: the kernel, the image built for it and
// an iPXE script that loads both by paths relative to itself (iPXE resolves
// them against the script's own URL), so the folder can be served as it is
// over HTTP or TFTP. The kernel must be of the release the modules were
// built for. On error nothing is left in Dir but what was there before.
func Write(ctx context.Context, o Options) (*Report, error) {
	if o.Dir == "" {
		return nil, errors.New("netboot: no output folder")
	}
	if err := checkCmdline(o.Append); err != nil {
		return nil, err
	}
	kernelRelease, err := KernelRelease(o.Kernel)
	if err != nil {
		return nil, err
	}
	if o.ModulesDir != "" {
		tree, err := kmod.Open(o.ModulesDir)
		if err != nil {
			return nil, err
		}
		if tree.Release() != kernelRelease {
			return nil, fmt.Errorf("kernel %s is release %s but the modules in %s are for %s: no module would load", o.Kernel, kernelRelease, o.ModulesDir, tree.Release())
		}
	}
	created := false
	if _, err := os.Stat(o.Dir); errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(o.Dir, 0o755); err != nil {
			return nil, fmt.Errorf("netboot: %w", err)
		}
		created = true
	}
	rep := &Report{
		KernelRelease: kernelRelease,
		Kernel:        filepath.Join(o.Dir, KernelFile),
		Initramfs:     filepath.Join(o.Dir, InitramfsFile),
		Script:        filepath.Join(o.Dir, ScriptFile),
		Cmdline:       strings.Join(append([]string{"initrd=" + InitramfsFile}, strings.Fields(o.Append)...), " "),
	}
	written := []string{}
	fail := func(err error) (*Report, error) {
		for _, p := range written {
			os.Remove(p)
		}
		if created {
			os.Remove(o.Dir)
		}
		return nil, err
	}
	bo := o.Options
	// The bundle's files replace older ones only once all are ready: a
	// failed build must not leave a new image beside an old kernel.
	tmpImage := filepath.Join(o.Dir, "."+InitramfsFile+".new")
	bo.Output = tmpImage
	if rep.Report, err = image.Build(ctx, bo); err != nil {
		return fail(err)
	}
	written = append(written, tmpImage)
	rep.Report.Output = rep.Initramfs

	tmpKernel := filepath.Join(o.Dir, "."+KernelFile+".new")
	if err := copyFile(ctx, o.Kernel, tmpKernel); err != nil {
		return fail(err)
	}
	written = append(written, tmpKernel)
	tmpScript := filepath.Join(o.Dir, "."+ScriptFile+".new")
	if err := image.WriteAtomically(ctx, tmpScript, func(w io.Writer) error {
		_, err := io.WriteString(w, ipxeScript(kernelRelease, rep.Cmdline))
		return err
	}); err != nil {
		return fail(err)
	}
	written = append(written, tmpScript)
	for _, mv := range [][2]string{{tmpKernel, rep.Kernel}, {tmpImage, rep.Initramfs}, {tmpScript, rep.Script}} {
		if err := os.Rename(mv[0], mv[1]); err != nil {
			return fail(fmt.Errorf("netboot: %w", err))
		}
	}
	return rep, nil
}

// ipxeScript is the bundle's boot script. "initrd=" on the command line is
// how the kernel's EFI stub finds the image when iPXE boots it as an EFI
// program (under BIOS the kernel ignores it).
func ipxeScript(release, cmdline string) string {
	return fmt.Sprintf(`#!ipxe
# unlockrd netboot bundle for kernel %s, written by mkunlockrd netboot.
# The paths are relative to this script's own URL: serve the folder as it
# is over HTTP or TFTP.
kernel %s %s
initrd %s
boot
`, release, KernelFile, cmdline, InitramfsFile)
}

// checkCmdline refuses what would break out of the script's kernel line:
// a line break would start a new iPXE command.
func checkCmdline(s string) error {
	for _, c := range s {
		if c < 0x20 || c == 0x7f {
			return fmt.Errorf("netboot: --append %q: control character %U: want one line of kernel arguments", s, c)
		}
	}
	return nil
}

// copyFile copies a file to dst through writeAtomically.
func copyFile(ctx context.Context, src, dst string) error {
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	return image.WriteAtomically(ctx, dst, func(w io.Writer) error {
		_, err := io.Copy(w, f)
		if err != nil {
			return fmt.Errorf("copying %s: %w", src, err)
		}
		return nil
	})
}

// KernelRelease reads the release (uname -r) from the version string in
// the setup header of an x86 bzImage, where file(1) finds it too.
func KernelRelease(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("kernel: %w", err)
	}
	defer f.Close()
	hdr := make([]byte, 0x210)
	if _, err := io.ReadFull(f, hdr); err != nil {
		return "", fmt.Errorf("kernel %s: not an x86 bzImage (%v)", path, err)
	}
	// boot_params.hdr: "HdrS" at 0x202, the protocol version at 0x206,
	// kernel_version (an offset from 0x200) at 0x20e.
	if !bytes.Equal(hdr[0x202:0x206], []byte("HdrS")) {
		return "", fmt.Errorf("kernel %s: not an x86 bzImage (no HdrS setup header)", path)
	}
	off := binary.LittleEndian.Uint16(hdr[0x20e:])
	if binary.LittleEndian.Uint16(hdr[0x206:]) < 0x200 || off == 0 {
		return "", fmt.Errorf("kernel %s: the setup header names no version", path)
	}
	ver := make([]byte, 256)
	n, err := f.ReadAt(ver, int64(off)+0x200)
	if n == 0 {
		return "", fmt.Errorf("kernel %s: version string: %v", path, err)
	}
	ver = ver[:n]
	if i := bytes.IndexByte(ver, 0); i >= 0 {
		ver = ver[:i]
	}
	fields := strings.Fields(string(ver))
	if len(fields) == 0 {
		return "", fmt.Errorf("kernel %s: empty version string", path)
	}
	return fields[0], nil
}
