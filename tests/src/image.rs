//! Generates OCI image layouts with random, reproducible layers, and verifies pulled layouts.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tempfile::TempDir;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// What image to generate.
///
/// Layer `i` depends only on `(seed, i, layers[i])`, so two specs with the same seed and the
/// same first sizes share those layers byte for byte (a shared base layer), and a different
/// seed gives entirely different layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// Uncompressed size in bytes of the one random file in each layer.
    pub layers: Vec<usize>,
    pub seed: u64,
}

impl ImageSpec {
    pub fn new(layers: Vec<usize>, seed: u64) -> Self {
        Self { layers, seed }
    }
}

/// A blob's digest (`sha256:<hex>`) and size in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlobInfo {
    pub digest: String,
    pub size: u64,
}

/// A generated OCI image layout in a temp dir (removed on drop), ready for
/// `skopeo copy oci:DIR:TAG ...`.
#[derive(Debug)]
pub struct TestImage {
    dir: TempDir,
    pub tag: String,
    pub manifest_digest: String,
    pub manifest_size: u64,
    pub config_digest: String,
    pub config_size: u64,
    /// Compressed layer blobs, in manifest order.
    pub layers: Vec<BlobInfo>,
    /// `sha256` of each uncompressed layer tar, as in the config's `rootfs.diff_ids`.
    pub diff_ids: Vec<String>,
    /// Sum of the compressed layer sizes: the layer bytes one pull transfers.
    pub total_size: u64,
}

impl TestImage {
    /// Writes the image described by `spec` into a new temp dir, tagged `tag`.
    ///
    /// This is CPU work (random bytes, gzip, SHA-256) and blocks; for large images inside an
    /// async test that also serves requests in-process, call it through `spawn_blocking`.
    pub fn generate(spec: &ImageSpec, tag: &str) -> Result<TestImage> {
        let dir = tempfile::Builder::new()
            .prefix("shoal-image-")
            .tempdir()
            .context("creating image temp dir")?;
        let blobs = dir.path().join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs).context("creating blobs/sha256")?;

        let mut layers = Vec::with_capacity(spec.layers.len());
        let mut diff_ids = Vec::with_capacity(spec.layers.len());
        for (index, &size) in spec.layers.iter().enumerate() {
            let (layer, diff_id) = write_layer(&blobs, spec.seed, index, size)
                .with_context(|| format!("writing layer {index} ({size} bytes)"))?;
            layers.push(layer);
            diff_ids.push(diff_id);
        }

        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": spec.layers.iter().enumerate().map(|(index, size)| json!({
                "created_by": format!("shoal-tests layer {index}: {size} random bytes, seed {}", spec.seed),
            })).collect::<Vec<_>>(),
        });
        let config = write_json_blob(&blobs, &config)?;

        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": { "mediaType": OCI_CONFIG, "digest": config.digest, "size": config.size },
            "layers": layers.iter().map(|layer| json!({
                "mediaType": OCI_LAYER_GZIP, "digest": layer.digest, "size": layer.size,
            })).collect::<Vec<_>>(),
        });
        let manifest = write_json_blob(&blobs, &manifest)?;

        let index = json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{
                "mediaType": OCI_MANIFEST,
                "digest": manifest.digest,
                "size": manifest.size,
                "annotations": { REF_NAME_ANNOTATION: tag },
            }],
        });
        std::fs::write(dir.path().join("index.json"), serde_json::to_vec(&index)?)
            .context("writing index.json")?;
        std::fs::write(
            dir.path().join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .context("writing oci-layout")?;

        Ok(TestImage {
            dir,
            tag: tag.to_owned(),
            manifest_digest: manifest.digest,
            manifest_size: manifest.size,
            config_digest: config.digest,
            config_size: config.size,
            total_size: layers.iter().map(|layer| layer.size).sum(),
            layers,
            diff_ids,
        })
    }

    /// The OCI layout directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Where the blob with `digest` lives in this layout.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        blob_path(self.dir(), digest)
    }

    /// The blobs a pull fetches: the config, then the layers in manifest order.
    pub fn blobs(&self) -> Vec<BlobInfo> {
        let config = BlobInfo {
            digest: self.config_digest.clone(),
            size: self.config_size,
        };
        std::iter::once(config)
            .chain(self.layers.iter().cloned())
            .collect()
    }

    /// Digests of the layers, in manifest order.
    pub fn layer_digests(&self) -> Vec<String> {
        self.layers
            .iter()
            .map(|layer| layer.digest.clone())
            .collect()
    }
}

/// `DIR/blobs/sha256/<hex>` for `sha256:<hex>`.
pub fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf> {
    let hex = digest
        .strip_prefix("sha256:")
        .with_context(|| format!("not a sha256 digest: {digest}"))?;
    ensure!(
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "malformed sha256 digest: {digest}"
    );
    Ok(layout.join("blobs").join("sha256").join(hex))
}

/// Checks a pulled OCI layout against the image that was pushed: every blob under
/// `blobs/sha256/` hashes to its file name, `index.json` points at a manifest that is present,
/// and every layer of `expected` is present with its size.
///
/// Layer digests survive a skopeo pull to an `oci:` layout (skopeo does not recompress), while
/// manifest and config digests do not when the image was pushed as Docker v2s2, so only layers
/// are compared. Blocks while hashing.
pub fn verify_layout(dir: &Path, expected: &TestImage) -> Result<()> {
    let blobs = dir.join("blobs").join("sha256");
    let mut present = HashSet::new();
    for entry in
        std::fs::read_dir(&blobs).with_context(|| format!("reading {}", blobs.display()))?
    {
        let entry = entry?;
        let name = entry.file_name();
        let name = name
            .to_str()
            .with_context(|| format!("non-UTF-8 blob name {name:?}"))?
            .to_owned();
        let actual = sha256_file(&entry.path())?;
        if actual != name {
            bail!(
                "blob {name} in {} hashes to sha256:{actual}",
                blobs.display()
            );
        }
        present.insert(format!("sha256:{name}"));
    }

    let index_path = dir.join("index.json");
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&index_path).with_context(|| format!("reading {}", index_path.display()))?,
    )
    .context("parsing index.json")?;
    let manifests = index["manifests"]
        .as_array()
        .context("index.json has no manifests array")?;
    ensure!(!manifests.is_empty(), "index.json lists no manifest");
    for manifest in manifests {
        let digest = manifest["digest"]
            .as_str()
            .context("index.json manifest without digest")?;
        ensure!(
            present.contains(digest),
            "index.json names manifest {digest}, which is not in blobs/"
        );
    }

    for layer in &expected.layers {
        ensure!(
            present.contains(&layer.digest),
            "layer {} missing from pulled layout (present: {present:?})",
            layer.digest
        );
        let size = blob_path(dir, &layer.digest)?.metadata()?.len();
        ensure!(
            size == layer.size,
            "layer {} has {size} bytes, expected {}",
            layer.digest,
            layer.size
        );
    }
    Ok(())
}

/// Hex SHA-256 of a file's contents.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = sha256_context();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finish()))
}

/// `sha256:<hex>` of a byte string.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
    )
}

/// Writes one gzip'ed tar layer holding a single random file. Returns the compressed blob and
/// the diff id (digest of the uncompressed tar).
fn write_layer(blobs: &Path, seed: u64, index: usize, size: usize) -> Result<(BlobInfo, String)> {
    let tmp = blobs.join(format!(".tmp-layer-{index}"));
    let file = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
    let mut tar = HashingWriter::new(StoredGzip::new(HashingWriter::new(file))?);

    // Fixed metadata so that the same (seed, index, size) always gives the same bytes.
    let mut header = tar::Header::new_gnu();
    header.set_path(format!("layer-{index}.bin"))?;
    header.set_size(size as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    tar.write_all(header.as_bytes())?;

    // Distinct seeds per layer index; the odd multiplier spreads nearby seeds apart before
    // SeedableRng's own seed expansion.
    let layer_seed = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(index as u64 + 1);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(layer_seed);
    let mut chunk = vec![0u8; 1 << 20];
    let mut remaining = size;
    while remaining > 0 {
        let n = remaining.min(chunk.len());
        rng.fill_bytes(&mut chunk[..n]);
        tar.write_all(&chunk[..n])?;
        remaining -= n;
    }
    // Pad the file to a 512-byte record, then the two zero records that end an archive.
    let padding = (512 - size % 512) % 512;
    tar.write_all(&vec![0u8; padding + 1024])?;

    let (gzip, diff_id, _) = tar.finish();
    let (file, hex, compressed_size) = gzip.finish()?.finish();
    // into_inner flushes the buffer and reports a failed final write.
    drop(file.into_inner().map_err(|err| err.into_error())?);
    std::fs::rename(&tmp, blobs.join(&hex))?;
    Ok((
        BlobInfo {
            digest: format!("sha256:{hex}"),
            size: compressed_size,
        },
        format!("sha256:{diff_id}"),
    ))
}

fn write_json_blob(blobs: &Path, value: &serde_json::Value) -> Result<BlobInfo> {
    let bytes = serde_json::to_vec(value)?;
    let digest = sha256_digest(&bytes);
    let hex = &digest["sha256:".len()..];
    std::fs::write(blobs.join(hex), &bytes).context("writing json blob")?;
    Ok(BlobInfo {
        digest,
        size: bytes.len() as u64,
    })
}

/// SHA-256 through ring, whose hand-written assembly runs at full speed even in the
/// unoptimised builds tests use (sha2 manages about 30 MB/s there, ring over 1 GB/s).
fn sha256_context() -> ring::digest::Context {
    ring::digest::Context::new(&ring::digest::SHA256)
}

/// A writer that hashes what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: ring::digest::Context,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: sha256_context(),
            written: 0,
        }
    }

    /// Returns the inner writer, the hex SHA-256 and the length of everything written.
    fn finish(self) -> (W, String, u64) {
        (self.inner, hex::encode(self.hasher.finish()), self.written)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Largest payload of one stored deflate block (its length field is 16 bits).
const STORED_BLOCK_MAX: usize = 65_535;

/// Writes a gzip member (RFC 1952) whose deflate stream uses only stored blocks (RFC 1951
/// section 3.2.4), i.e. gzip level 0.
///
/// Random layer data does not compress, so real compression would only cost time: in the
/// unoptimised builds tests use, flate2's deflate runs at about 7 MB/s, which would make a
/// 64 MiB layer take 10 s. Stored blocks are ordinary gzip that every client decompresses.
struct StoredGzip<W: Write> {
    inner: W,
    block: Vec<u8>,
    crc: flate2::Crc,
}

impl<W: Write> StoredGzip<W> {
    fn new(mut inner: W) -> io::Result<Self> {
        // Magic, CM=deflate, no flags, MTIME=0 (reproducible), XFL=0, OS=3 (Unix).
        inner.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3])?;
        Ok(Self {
            inner,
            block: Vec::with_capacity(STORED_BLOCK_MAX),
            crc: flate2::Crc::new(),
        })
    }

    fn write_block(&mut self, last: bool) -> io::Result<()> {
        // The block fits in 16 bits because `write` never fills it beyond STORED_BLOCK_MAX.
        let len = self.block.len() as u16;
        // BFINAL in bit 0, BTYPE=00 (stored); the rest of the byte is padding to the boundary.
        self.inner.write_all(&[u8::from(last)])?;
        self.inner.write_all(&len.to_le_bytes())?;
        self.inner.write_all(&(!len).to_le_bytes())?;
        self.inner.write_all(&self.block)?;
        self.block.clear();
        Ok(())
    }

    /// Ends the deflate stream and writes the trailer (CRC-32 and length mod 2^32).
    fn finish(mut self) -> io::Result<W> {
        self.write_block(true)?;
        self.inner.write_all(&self.crc.sum().to_le_bytes())?;
        self.inner.write_all(&self.crc.amount().to_le_bytes())?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for StoredGzip<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.block.len() == STORED_BLOCK_MAX {
            self.write_block(false)?;
        }
        let n = buf.len().min(STORED_BLOCK_MAX - self.block.len());
        self.block.extend_from_slice(&buf[..n]);
        self.crc.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_layers_and_shared_prefix() {
        let a = TestImage::generate(&ImageSpec::new(vec![1000, 2000], 1), "a").unwrap();
        let b = TestImage::generate(&ImageSpec::new(vec![1000, 3000], 1), "b").unwrap();
        let c = TestImage::generate(&ImageSpec::new(vec![1000, 2000], 2), "c").unwrap();
        assert_eq!(a.layers[0], b.layers[0]);
        assert_ne!(a.layers[1], b.layers[1]);
        assert_ne!(a.layers[0], c.layers[0]);
        assert_ne!(a.manifest_digest, c.manifest_digest);
        verify_layout(a.dir(), &a).unwrap();
        assert!(verify_layout(a.dir(), &c).is_err());
    }

    #[test]
    fn diff_ids_match_uncompressed_tars() {
        let image = TestImage::generate(&ImageSpec::new(vec![200_000], 9), "t").unwrap();
        let blob = std::fs::read(image.blob_path(&image.layers[0].digest).unwrap()).unwrap();
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&blob[..])
            .read_to_end(&mut tar)
            .unwrap();
        assert_eq!(sha256_digest(&tar), image.diff_ids[0]);
        let mut archive = tar::Archive::new(&tar[..]);
        let entries: Vec<_> = archive.entries().unwrap().collect();
        assert_eq!(entries.len(), 1);
    }

    #[test]
    fn corrupted_blob_fails_verification() {
        let image = TestImage::generate(&ImageSpec::new(vec![100], 3), "t").unwrap();
        let path = image.blob_path(&image.layers[0].digest).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[10] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let err = verify_layout(image.dir(), &image).unwrap_err();
        assert!(format!("{err:#}").contains("hashes to"), "{err:#}");
    }
}
