package blockdev

// Kind is the family of what a device holds. Callers decide by Kind (and
// Format within it), never by comparing display strings: "LUKS2 (secondary
// header only)" is still LUKS2.
type Kind int

// Kinds of content.
const (
	Blank      Kind = iota // no known signature
	Unreadable             // the device could not be read (Content.Err)
	LUKS                   // a LUKS header (Format LUKS1 or LUKS2)
	FileSystem             // Format is the file-system type, as mount(2) names it
	Swap
	Other // partition tables, RAID and volume-manager members, BitLocker, bcache
)

// Content is what a probe found on a device.
type Content struct {
	Kind   Kind
	Format string // "LUKS2", "ext4", "swap", "gpt", "linux_raid_member", ...; "" when Blank
	// SecondaryOnly is set for LUKS2 found only by its secondary header:
	// the primary copy is damaged, and the volume still opens from the
	// secondary (the header reader falls back to it).
	SecondaryOnly bool
	Err           error // why it is Unreadable
}

// IsLUKS2 reports whether the device holds a LUKS2 volume, from either
// header copy.
func (c Content) IsLUKS2() bool { return c.Kind == LUKS && c.Format == "LUKS2" }

// String is the content for messages.
func (c Content) String() string {
	switch {
	case c.Kind == Blank:
		return "no known signature"
	case c.Kind == Unreadable:
		return "unreadable: " + c.Err.Error()
	case c.SecondaryOnly:
		return c.Format + " (secondary header only)"
	}
	return c.Format
}

// kinds sorts the formats probeBytes recognises.
var kinds = map[string]Kind{
	"ext2": FileSystem, "ext3": FileSystem, "ext4": FileSystem, "xfs": FileSystem, "btrfs": FileSystem,
	"squashfs": FileSystem, "f2fs": FileSystem, "ntfs": FileSystem, "iso9660": FileSystem, "vfat": FileSystem,
	"swap": Swap,
}

// content is the Content of a recognised format other than LUKS.
func content(format string) Content {
	k, ok := kinds[format]
	if !ok {
		k = Other
	}
	return Content{Kind: k, Format: format}
}
