// Command smokeinit is the /init of the image package's QEMU smoke test: it
// proves the kernel unpacked the image (it runs at all), gave PID 1 a
// console (/dev/console in the archive), and can load the image's modules
// in the order written to modules.json, then powers the machine off.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"syscall"
	"unsafe"
)

// sysFinitModule is finit_module(2) on x86-64, the only machine the smoke
// test boots; package syscall does not name it.
const sysFinitModule = 313

// Marker is what the test looks for on the serial console.
const Marker = "UNLOCKRD-SMOKE-OK"

func main() {
	fmt.Println("smokeinit: running as pid", os.Getpid())
	var required, optional []string
	loaded := 0
	b, err := os.ReadFile("/etc/unlockrd/modules.json")
	if err != nil {
		fmt.Println("smokeinit:", err)
		off()
	}
	var mods []struct {
		Name     string `json:"name"`
		Path     string `json:"path"`
		Optional bool   `json:"optional"`
	}
	if err := json.Unmarshal(b, &mods); err != nil {
		fmt.Println("smokeinit:", err)
		off()
	}
	params, _ := syscall.BytePtrFromString("")
	for _, m := range mods {
		err := load("/"+m.Path, params)
		switch {
		case err == nil || err == syscall.EEXIST:
			loaded++
		case m.Optional:
			optional = append(optional, fmt.Sprintf("%s(%v)", m.Name, err))
		default:
			required = append(required, fmt.Sprintf("%s(%v)", m.Name, err))
		}
	}
	cfg, err := os.ReadFile("/etc/unlockrd/config.json")
	fmt.Printf("smokeinit: config %d bytes (%v); modules loaded=%d of %d\n", len(cfg), err, loaded, len(mods))
	fmt.Printf("smokeinit: failed-optional=[%s]\n", strings.Join(optional, " "))
	fmt.Printf("smokeinit: failed-required=[%s]\n", strings.Join(required, " "))
	fmt.Println(Marker)
	off()
}

func load(path string, params *byte) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_, _, errno := syscall.Syscall(sysFinitModule, f.Fd(), uintptr(unsafe.Pointer(params)), 0)
	if errno != 0 {
		return errno
	}
	return nil
}

func off() {
	syscall.Sync()
	syscall.Reboot(syscall.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}
