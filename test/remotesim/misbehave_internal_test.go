package remotesim

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestWritePaddedEmptyObject(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		size int64
		want string
	}{
		{14, `{"_pad":"xxx"}`},
		{11, `{"_pad":""}`},
		{10, `{}`},
	} {
		var buf bytes.Buffer
		require.NoError(t, writePadded(&buf, []byte(`{}`), padLength([]byte(`{}`), tt.size)))
		require.Equal(t, tt.want, buf.String(), "size %d", tt.size)
	}
}

func TestWithField(t *testing.T) {
	t.Parallel()
	require.Equal(t, `{"n":1}`, string(withField([]byte(`{}`), "n", []byte(`1`))))
	require.Equal(t, `{"a":2,"n":1}`, string(withField([]byte(`{"a":2}`), "n", []byte(`1`))))
	require.Equal(t, `[1]`, string(withField([]byte(`[1]`), "n", []byte(`1`))), "not an object")
	body := []byte(`{"a":2}`)
	withField(body[:len(body):len(body)], "n", []byte(`1`))
	require.Equal(t, `{"a":2}`, string(body), "the original is never modified")
}
