package store_test

import (
	"testing"

	"github.com/unlockrd/unlockrd/unlock/keyserver/store"
	"github.com/unlockrd/unlockrd/unlock/keyserver/store/storetest"
)

func TestMemoryContract(t *testing.T) {
	storetest.Run(t, store.NewMemory())
}
