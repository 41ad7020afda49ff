// Command unlockrd-init is PID 1 of the unlockrd image: it unlocks the
// disks with a key fetched over pinned TLS and switches root (DESIGN §2).
package main

import "github.com/unlockrd/unlockrd/initramfs/boot"

func main() {
	boot.Main()
}
