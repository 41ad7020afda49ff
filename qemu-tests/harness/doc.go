// Package harness is the test bench of unlockrd's QEMU tests, demo and
// benchmarks: it builds GPT disk images with plain ext4 and LUKS2
// partitions (no root, loop devices or device-mapper needed), builds the
// test init that reports on a booted system, and runs the cached Debian
// kernel in QEMU with its serial console read line by line.
//
// A boot test of the real image looks like:
//
//	fx, err := harness.NewFixture(ctx, t.TempDir(), nil)
//	// ... start a key server serving fx.Key, build initramfs.img ...
//	vm := harness.StartVM(t, harness.VMOptions{
//		Initramfs: initramfs,
//		Disks:     []harness.Drive{{Path: fx.Disk.Path}},
//		Append:    []string{"rd.unlockrd.url=https://10.0.2.2:8443/k"},
//	})
//	vm.ExpectLine(`^unlockrd: network: `, 3*time.Minute)
//	rep := vm.ExpectReport(5 * time.Minute)
//	if rep.Files[harness.HelloPath].SHA256 != fx.HelloSHA256() { ... }
//	vm.Wait(2 * time.Minute)
//
// Timeouts are in minutes on purpose: TCG (there is no KVM here) boots in
// seconds when idle but can take a minute under load.
package harness
