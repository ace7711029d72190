//! Settings that take one of a few names. The config crate reports a bad
//! enum variant without the choices, so these parse from text and say what
//! is allowed.

/// Declares a settings enum that reads from and writes to its name (matched
/// without regard to ASCII case), with an error listing every allowed name.
#[macro_export]
#[doc(hidden)]
macro_rules! setting_enum {
    (
        $(#[$meta:meta])*
        $name:ident {
            $(#[$vmeta:meta])* $default:ident = $dname:literal (default),
            $( $(#[$ometa:meta])* $variant:ident = $vname:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ::serde::Serialize, ::serde::Deserialize)]
        #[serde(try_from = "String", into = "&'static str")]
        pub enum $name {
            $(#[$vmeta])*
            #[default]
            $default,
            $( $(#[$ometa])* $variant, )*
        }

        impl $name {
            /// Every allowed name, the default first.
            pub const NAMES: &'static [&'static str] = &[$dname, $($vname),*];

            /// Every value, in the order of [`Self::NAMES`].
            pub const ALL: &'static [Self] = &[Self::$default, $(Self::$variant),*];

            /// The name in settings.
            pub fn as_str(self) -> &'static str {
                match self {
                    Self::$default => $dname,
                    $( Self::$variant => $vname, )*
                }
            }
        }

        impl From<$name> for &'static str {
            fn from(value: $name) -> Self {
                value.as_str()
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;

            fn try_from(text: String) -> Result<Self, String> {
                let wanted = text.trim();
                // Without case, comparing both sides: names are not all
                // lower case (`EdDSA`), and `eddsa` or `ES256` mean the same.
                Self::ALL
                    .iter()
                    .copied()
                    .find(|value| value.as_str().eq_ignore_ascii_case(wanted))
                    .ok_or_else(|| {
                        format!(
                            "{text:?} is not allowed; use one of: {}",
                            Self::NAMES.join(", ")
                        )
                    })
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
