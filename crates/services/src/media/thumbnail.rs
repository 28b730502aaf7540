//! Thumbnails of PNG, JPEG and WebP images, made at a few fixed sizes (Synapse's defaults) so
//! that each stored image has a bounded number of cached thumbnails whatever clients ask for.

use std::io::Cursor;

use image::{
    DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, codecs::jpeg::JpegEncoder,
    imageops::FilterType, metadata::Orientation,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Method {
    /// Fill the box exactly, cropping what overflows.
    Crop,
    /// Fit within the box, keeping the aspect ratio and never enlarging.
    Scale,
}

impl Method {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Crop => "crop",
            Self::Scale => "scale",
        }
    }
}

/// The boxes thumbnails are made for, smallest first within each method.
const SIZES: [(Method, u32, u32); 5] = [
    (Method::Crop, 32, 32),
    (Method::Crop, 96, 96),
    (Method::Scale, 320, 240),
    (Method::Scale, 640, 480),
    (Method::Scale, 800, 600),
];

/// The largest source read to be thumbnailed: decoding needs it whole in memory.
pub(super) const MAX_SOURCE_BYTES: u64 = 32 * 1024 * 1024;
/// Decoding limits against decompression bombs; the pixel count is Synapse's `max_image_pixels`.
const MAX_SOURCE_PIXELS: u64 = 32_000_000;
const MAX_SOURCE_SIDE: u32 = 16_384;
const MAX_DECODE_BYTES: u64 = 256 * 1024 * 1024;
const JPEG_QUALITY: u8 = 85;
const FILTER: FilterType = FilterType::CatmullRom;

/// The box that answers a request: the smallest of its method that covers the requested size,
/// else the largest (the spec lets servers answer with a larger or the closest thumbnail).
pub(super) fn size_for(method: Method, width: u64, height: u64) -> (u32, u32) {
    let mut boxes = SIZES.iter().filter(|(m, ..)| *m == method).map(|&(_, w, h)| (w, h));
    boxes
        .clone()
        .find(|&(w, h)| u64::from(w) >= width && u64::from(h) >= height)
        .or_else(|| boxes.next_back())
        .expect("every method has sizes")
}

pub(super) struct Thumbnail {
    pub bytes: Vec<u8>,
    pub content_type: &'static str,
}

/// Makes the thumbnail of `source` for the box `width`×`height`; the error says why it cannot.
pub(super) fn make(source: &[u8], method: Method, width: u32, height: u32) -> Result<Thumbnail, String> {
    let mut reader = ImageReader::new(Cursor::new(source)).with_guessed_format().map_err(|e| e.to_string())?;
    let format = reader
        .format()
        .filter(|f| matches!(f, ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP))
        .ok_or("not a PNG, JPEG or WebP image")?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SOURCE_SIDE);
    limits.max_image_height = Some(MAX_SOURCE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| e.to_string())?;
    let (source_width, source_height) = decoder.dimensions();
    if u64::from(source_width) * u64::from(source_height) > MAX_SOURCE_PIXELS {
        return Err(format!("images over {MAX_SOURCE_PIXELS} pixels are not thumbnailed"));
    }
    // Phone photos are often stored sideways with an EXIF orientation.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| e.to_string())?;
    image.apply_orientation(orientation);

    let image = match method {
        Method::Crop => image.resize_to_fill(width, height, FILTER),
        Method::Scale if image.width() > width || image.height() > height => image.resize(width, height, FILTER),
        Method::Scale => image,
    };

    // PNG stays PNG (sharp edges, transparency), JPEG stays JPEG; WebP becomes PNG only when it
    // has transparency to keep.
    let mut bytes = Vec::new();
    let content_type = if format == ImageFormat::Png || (format == ImageFormat::WebP && image.color().has_alpha()) {
        image.write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png).map_err(|e| e.to_string())?;
        "image/png"
    } else {
        JpegEncoder::new_with_quality(&mut bytes, JPEG_QUALITY).encode_image(&image.to_rgb8()).map_err(|e| e.to_string())?;
        "image/jpeg"
    };
    Ok(Thumbnail { bytes, content_type })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_get_the_smallest_covering_size() {
        assert_eq!(size_for(Method::Crop, 1, 1), (32, 32));
        assert_eq!(size_for(Method::Crop, 33, 20), (96, 96));
        assert_eq!(size_for(Method::Crop, 500, 500), (96, 96));
        assert_eq!(size_for(Method::Scale, 320, 240), (320, 240));
        assert_eq!(size_for(Method::Scale, 321, 100), (640, 480));
        assert_eq!(size_for(Method::Scale, 4000, 3000), (800, 600));
    }

    #[test]
    fn non_images_are_refused() {
        assert!(make(b"just text", Method::Scale, 320, 240).is_err());
    }

    #[test]
    fn sources_over_the_pixel_bound_are_refused_before_decoding() {
        let mut jpeg = Vec::new();
        JpegEncoder::new(&mut jpeg).encode_image(&DynamicImage::new_rgb8(8, 8)).unwrap();
        assert!(make(&jpeg, Method::Scale, 320, 240).is_ok());
        // The frame header says 6000×6000 (36M pixels, within the side and allocation limits).
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        jpeg[sof + 5..sof + 9].copy_from_slice(&[0x17, 0x70, 0x17, 0x70]);
        let refused = make(&jpeg, Method::Scale, 320, 240).err().unwrap();
        assert!(refused.contains("pixels"), "{refused}");
    }
}
