package main

// talosvalidate cripart: merge CRI configuration parts the way Talos does.
//
// Talos merges every /etc/cri/conf.d/*.part, in lexicographic order, into the CRI
// containerd's config: files.CRIConfigPartsController (internal/app/machined/pkg/
// controllers/files/cri_config_parts.go) calls toml.Merge (internal/pkg/toml/merge.go),
// which decodes each part with github.com/pelletier/go-toml/v2 into a map[string]any and
// merges the maps with the machinery's config/merge.Merge. A part that does not decode or
// merge stops the controller, so containerd gets no new config. Those packages are
// internal to the talos module (Go forbids importing them from here), and the machinery
// exposes no check for CRI parts, so this runs the same two public pieces in the same
// order: go-toml/v2 at the version Talos v1.13.0 pins (v2.2.4) and the machinery's merge.

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"

	"github.com/pelletier/go-toml/v2"
	"github.com/siderolabs/talos/pkg/machinery/config/merge"
)

func cmdCRIPart(args []string, stdout io.Writer) error {
	fs := newFlags("cripart")

	if err := parse(fs, args); err != nil {
		return err
	}

	if fs.NArg() == 0 {
		return usageError{"cripart takes one or more PART files"}
	}

	// Talos globs one directory and sorts the paths; parts given from several
	// directories here are ordered by their file name, as they would be in conf.d.
	parts := append([]string{}, fs.Args()...)
	sort.SliceStable(parts, func(i, j int) bool { return filepath.Base(parts[i]) < filepath.Base(parts[j]) })

	merged := map[string]any{}

	for _, part := range parts {
		data, err := os.ReadFile(part)
		if err != nil {
			return err
		}

		partial := map[string]any{}

		if err = toml.NewDecoder(bytes.NewReader(data)).Decode(&partial); err != nil {
			return fmt.Errorf("error decoding %q: %w", filepath.Base(part), err)
		}

		if err = merge.Merge(merged, partial); err != nil {
			return fmt.Errorf("error merging %q: %w", filepath.Base(part), err)
		}
	}

	return toml.NewEncoder(stdout).SetIndentTables(true).Encode(merged)
}
