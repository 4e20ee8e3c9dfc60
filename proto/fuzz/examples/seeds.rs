//! Writes the fuzz corpus seeds: one valid frame of every message variant of every channel
//! (`shoal_proto::wire::samples`), one file each, into the directory given as the argument.
//! `scripts/fuzz` runs it before each fuzzing run, so the seeds always match the current wire
//! format.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir: PathBuf = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("seeds"));
    std::fs::create_dir_all(&dir)?;
    let frames = shoal_proto::wire::samples::frames();
    for (name, frame) in &frames {
        std::fs::write(dir.join(name), frame)?;
    }
    // One stream per channel with all its frames back to back, so frame boundaries fall
    // inside the chunks the decoder is fed.
    for channel in ["agent", "coord", "peer"] {
        let stream: Vec<u8> = frames
            .iter()
            .filter(|(name, _)| name.starts_with(channel))
            .flat_map(|(_, frame)| frame.iter().copied())
            .collect();
        std::fs::write(dir.join(format!("{channel}-stream")), stream)?;
    }
    eprintln!("wrote {} seeds to {}", frames.len() + 3, dir.display());
    Ok(())
}
