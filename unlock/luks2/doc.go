// Package luks2 is pure LUKS2: reading and checksumming a header, checking
// it against a policy before any key is tried (DESIGN §6), and unsealing a
// keyslot into the volume key. It does no I/O beyond an io.ReaderAt and
// imports nothing boot-only, so the boot (PID 1), a host-side checker and
// the fuzzer all run the same code.
package luks2
