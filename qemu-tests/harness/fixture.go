package harness

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"

	"github.com/unlockrd/unlockrd/qemu-tests/testinit/initcfg"
)

// Names and paths of the walking-skeleton disk (DefaultDisk).
const (
	// DataMountPoint is where the data volume is mounted in the root.
	DataMountPoint = "/var/lib/postgresql"
	// HelloFile is the file on the data volume, relative to its root.
	HelloFile = "/hello.txt"
	// HelloPath is where the test init finds HelloFile after a boot.
	HelloPath = DataMountPoint + HelloFile
)

// DefaultDisk is the walking-skeleton disk: PARTLABEL root (plain ext4,
// label "root", test init reporting HelloPath), data (LUKS2 with 4096-byte
// sectors, ext4 inside holding HelloFile with random text) and swap (LUKS2
// with 512-byte sectors, so both sector sizes are exercised). key is the
// passphrase of keyslot 0 of both volumes. The hello content differs on
// every call; read it back with Hello.
func DefaultDisk(key []byte) Disk {
	nonce := make([]byte, 16)
	_, _ = rand.Read(nonce)
	hello := []byte(fmt.Sprintf("hello from unlockrd %x\nsecond line\n", nonce))
	return Disk{Partitions: []Partition{
		{
			Name: "root",
			Size: 32 * mib,
			FS:   TestRoot("root", TestInitConfig{Files: []string{HelloPath}}, DataMountPoint),
		},
		{
			Name: "data",
			Size: 24 * mib,
			LUKS: &LUKS{Keys: [][]byte{key}, Label: "data", SectorSize: 4096},
			FS:   &Ext4{Label: "data", Files: []File{{Path: HelloFile, Data: hello}}},
		},
		{
			Name: "swap",
			Size: 16 * mib,
			Swap: true,
			LUKS: &LUKS{Keys: [][]byte{key}, Label: "swap", SectorSize: 512},
		},
	}}
}

// Partition returns the described partition called name, or nil.
func (d Disk) Partition(name string) *Partition {
	for i := range d.Partitions {
		if d.Partitions[i].Name == name {
			return &d.Partitions[i]
		}
	}
	return nil
}

// Hello returns the content of HelloFile on the data partition of a disk
// made by DefaultDisk.
func (d Disk) Hello() []byte {
	if p := d.Partition("data"); p != nil && p.FS != nil {
		b, _ := p.FS.File(HelloFile)
		return b
	}
	return nil
}

// Fixture is a built walking-skeleton disk with its secrets.
type Fixture struct {
	// Disk is the built image.
	Disk *BuiltDisk
	// Key is the passphrase the key server must serve.
	Key []byte
	// Hello is the content of HelloPath.
	Hello []byte
}

// NewFixture builds DefaultDisk into dir/disk.img. A nil key generates a
// random 32-byte one.
func NewFixture(ctx context.Context, dir string, key []byte) (*Fixture, error) {
	if key == nil {
		key = make([]byte, 32)
		if _, err := rand.Read(key); err != nil {
			return nil, err
		}
	}
	d := DefaultDisk(key)
	bd, err := d.Build(ctx, dir)
	if err != nil {
		return nil, err
	}
	return &Fixture{Disk: bd, Key: key, Hello: d.Hello()}, nil
}

// HelloSHA256 is the hex SHA-256 of Hello.
func (f *Fixture) HelloSHA256() string {
	s := sha256.Sum256(f.Hello)
	return hex.EncodeToString(s[:])
}

// HelloLine is the exact line the test init prints when the data volume
// is mounted and HelloPath reads back intact.
func (f *Fixture) HelloLine() string {
	return FileLine(HelloPath, f.Hello)
}

// FileLine is the line the test init prints for a file with content b.
func FileLine(path string, b []byte) string {
	s := sha256.Sum256(b)
	return fmt.Sprintf("%sfile %s sha256=%s content=%s", TestInitPrefix, path, hex.EncodeToString(s[:]), initcfg.FirstLine(b))
}
