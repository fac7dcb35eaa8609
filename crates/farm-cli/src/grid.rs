//! Image grids, as in the walkthrough: `rows x cols` tiles of equal size, row-major.

use anyhow::Context;
use image::{GenericImage, RgbImage};

pub fn grid(images: &[RgbImage], rows: u32, cols: u32) -> anyhow::Result<RgbImage> {
    let first = images.first().context("no images for the grid")?;
    let (w, h) = first.dimensions();
    anyhow::ensure!(
        images.len() as u32 <= rows * cols,
        "{} images do not fit a {rows}x{cols} grid",
        images.len()
    );
    let mut out = RgbImage::new(w * cols, h * rows);
    for (i, img) in images.iter().enumerate() {
        anyhow::ensure!(img.dimensions() == (w, h), "grid images differ in size");
        let (r, c) = (i as u32 / cols, i as u32 % cols);
        out.copy_from(img, c * w, r * h).context("grid tile")?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_land_in_row_major_order() {
        let a = RgbImage::from_pixel(2, 2, image::Rgb([255, 0, 0]));
        let b = RgbImage::from_pixel(2, 2, image::Rgb([0, 255, 0]));
        let g = grid(&[a, b], 1, 2).expect("grid");
        assert_eq!(g.dimensions(), (4, 2));
        assert_eq!(g.get_pixel(0, 0).0, [255, 0, 0]);
        assert_eq!(g.get_pixel(3, 1).0, [0, 255, 0]);
    }
}
